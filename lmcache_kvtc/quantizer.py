"""Uniform scalar quantization of PCA coefficients: one step per stream and plan, no side information.

Each kept component of a token is rounded to a multiple of the plan's step. Under a squared-error
objective one step for every component is what reverse water-filling prescribes (components whose
spread is well below the step are dropped), and it needs nothing per token: the per-token min/max of
the previous format cost 32 bits per block per token and wasted levels on fixed-width codes. The
symbols of low-variance components are mostly 0 and ±1, which DEFLATE's Huffman stage codes in close
to their entropy.

Symbol stream of ``n`` tokens (component-major, so each Huffman table sees components of similar
spread): the low bytes of all ``rank`` components (``[rank, n]``, two's complement), then the high
bytes of the first ``wide`` components (``[wide, n]``). Narrow components are clamped to int8, wide
ones to int16; a component is wide when its calibrated spread would overflow int8.
"""

from __future__ import annotations

import torch

#: a component is wide (int16) if this many standard deviations exceed int8's range in steps
WIDE_SIGMAS = 8.0
NARROW_LIMIT = 127
WIDE_LIMIT = 32767


def wide_count(sigmas: torch.Tensor, step: float, rank: int) -> int:
    """How many leading components (``sigmas`` decreasing) need int16 symbols at ``step``."""
    return int((sigmas[:rank] * WIDE_SIGMAS > NARROW_LIMIT * step).sum())


def section_size(rank: int, wide: int, tokens: int) -> int:
    """Bytes of the symbol stream of ``tokens`` tokens."""
    return (rank + wide) * tokens


def quantize(coefficients: torch.Tensor, step: float, wide: int) -> torch.Tensor:
    """``[n, rank]`` fp32 coefficients -> the uint8 symbol stream (see the module docstring)."""
    symbols = torch.round(coefficients.T / step)
    symbols[:wide].clamp_(-WIDE_LIMIT, WIDE_LIMIT)
    symbols[wide:].clamp_(-NARROW_LIMIT, NARROW_LIMIT)
    symbols = symbols.to(torch.int16)
    low = (symbols & 0xFF).to(torch.uint8)
    high = ((symbols[:wide] >> 8) & 0xFF).to(torch.uint8)
    return torch.cat((low.reshape(-1), high.reshape(-1)))


def dequantize(stream: torch.Tensor, step: float, rank: int, wide: int, tokens: int) -> torch.Tensor:
    """Inverse of :func:`quantize`: the uint8 stream of ``section_size`` bytes -> ``[n, rank]`` fp32."""
    low = stream[: rank * tokens].view(rank, tokens)
    high = stream[rank * tokens :].view(wide, tokens)
    symbols = low.view(torch.int8).to(torch.int32)
    if wide:
        symbols[:wide] = low[:wide].to(torch.int32) + high.view(torch.int8).to(torch.int32) * 256
    return (symbols.float() * step).T
