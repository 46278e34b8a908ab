"""The error taxonomy: every bad input ends in one of these, never in wrong KV."""


class CodecError(Exception):
    """Base class of everything the codec refuses to encode, decode or load."""


class TruncatedBlobError(CodecError):
    """The blob ends before the bytes its header promises."""


class CorruptBlobError(CodecError):
    """A checksum or an internal size does not match: the bytes changed after encoding."""


class ForeignBlobError(CodecError):
    """Not a KVTC blob, or a format version this code does not read."""


class CalibrationMismatchError(CodecError):
    """The blob was made with another calibration (or for another model/layout)."""


class LayoutError(CodecError):
    """The KV tensor has a shape, dtype or size this calibration cannot code."""


class CalibrationError(CodecError):
    """A calibration file is missing, malformed or inconsistent."""


class UnsupportedLayoutError(LayoutError):
    """An LMCache object the serde cannot code: MLA, fp8/uint8 KV, an unknown or unverifiable layout."""


class SealError(CodecError):
    """A sealed object does not open under this tenant's key for this object key (or is not sealed)."""
