"""Defaults the codec, the calibration and the LMCache integration share: change them here, nowhere else."""

#: leading tokens (attention sinks) stored exactly, where a chunk starts at sequence position 0
SINKS = 4
#: trailing tokens the standalone codec stores exactly (the serde never sees a sequence's end and keeps none)
WINDOW = 128
#: LMCache's default chunk: the unit of the calibration's rate-distortion curves and of the serde's objects
CHUNK_TOKENS = 256
