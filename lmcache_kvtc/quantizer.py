"""Per-token, per-block uniform quantization of PCA coefficients, and symbol packing.

Each block of consecutive components of one token gets its own fp16 shift (the block
minimum) and fp16 scale (range / (2^bits - 1)), so every token decodes on its own.
The same function quantizes at encode time and simulates the error for the bit
allocation, so the plan's predicted error is the error the codec makes.
"""

from __future__ import annotations

import torch

#: widths the bit allocation may choose; 0 means "dropped" (reconstructed as the mean).
BIT_WIDTHS = (0, 2, 4, 8)
#: fp16 shift + fp16 scale per block per token.
SIDE_BITS = 32
FP16_MAX = 65504.0


def quantize(x: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x[..., blocks, size]`` with per-block ``bits[blocks]``.

    Returns ``(codes uint8 like x, shift fp16 [..., blocks], scale fp16 [..., blocks])``.
    """
    levels = (2.0 ** bits.to(x.device, torch.float32) - 1.0)
    lo = x.amin(dim=-1)
    hi = x.amax(dim=-1)
    shift = lo.to(torch.float16)
    scale = ((hi - shift.float()) / levels).to(torch.float16)
    step = scale.float().unsqueeze(-1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((x - shift.float().unsqueeze(-1)) / safe)
    codes = torch.minimum(codes.clamp_(min=0), levels.unsqueeze(-1))
    codes = torch.where(step > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.uint8), shift, scale


def dequantize(codes: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize` (fp32)."""
    return shift.float().unsqueeze(-1) + codes.float() * scale.float().unsqueeze(-1)


def squared_error(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Sum over tokens and components of the squared error of quantizing ``x[tokens, blocks, size]``.

    Returns one value per block (fp64); ``bits == 0`` is the error of dropping the block.
    """
    if bits == 0:
        return x.double().square().sum(dim=(0, 2))
    codes, shift, scale = quantize(x, torch.full((x.shape[1],), bits))
    return (dequantize(codes, shift, scale) - x).double().square().sum(dim=(0, 2))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack rows of codes ``[rows, n]`` along ``n`` into whole bytes (1, 2 or 4 per byte).

    Widths that divide 8 keep symbols byte-aligned, which DEFLATE's byte Huffman likes.
    """
    per_byte = 8 // bits
    rows, n = codes.shape
    padded = -(-n // per_byte) * per_byte
    if padded != n:
        codes = torch.cat((codes, codes.new_zeros(rows, padded - n)), dim=1)
    grouped = codes.reshape(rows, padded // per_byte, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[rows, bytes] -> [rows, n]`` uint8 codes."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    mask = (1 << bits) - 1
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & mask
    return codes.reshape(packed.shape[0], -1)[:, :n].to(torch.uint8)


def packed_size(rows: int, n: int, bits: int) -> int:
    """Bytes :func:`pack` produces for ``rows`` rows of ``n`` codes."""
    return rows * -(-n // (8 // bits))
