"""Defaults the codec, the calibration and the LMCache integration share: change them here, nowhere else."""

#: leading tokens (attention sinks) stored exactly, where a chunk starts at sequence position 0
SINKS = 4
#: trailing tokens the standalone codec stores exactly (the serde never sees a sequence's end and keeps none)
WINDOW = 128
#: LMCache's default chunk: the unit of the calibration's rate-distortion curves and of the serde's objects
CHUNK_TOKENS = 256
#: the serde's byte budget (1/ratio of bf16) when its JSON gives none: the largest ratio that stays near-lossless
#: (KL ≤ 0.03 and ΔNLL ≤ 0.03 nats/token) on the worst evaluation source through LMCache (README, "Calibration
#: text": held-out code decides; 16 sits on the bound there)
RATIO = 12.0
#: calibration text: tokens in total (the floor of the checkout's default calibrations) and tokens per context
CALIBRATION_TOKENS = 48 * 1024
CALIBRATION_CONTEXT = 2048
