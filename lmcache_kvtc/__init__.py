"""KVTC (KV Cache Transform Coding) for LMCache: calibrated PCA + uniform quantization + DEFLATE."""

from .calibration import Calibration
from .codec import KVTCCodec
from .errors import (
    CalibrationError,
    CalibrationMismatchError,
    CodecError,
    CorruptBlobError,
    ForeignBlobError,
    LayoutError,
    TruncatedBlobError,
)

__all__ = [
    "Calibration",
    "KVTCCodec",
    "CodecError",
    "CalibrationError",
    "CalibrationMismatchError",
    "CorruptBlobError",
    "ForeignBlobError",
    "LayoutError",
    "TruncatedBlobError",
]
