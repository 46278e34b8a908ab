"""Bit allocation: which block size and width each run of principal components gets.

A dynamic program over consecutive components (sorted by decreasing variance) picks, for
every block, a size in {1, 16, 64, 256, 1024} and a width in {dropped, int2, int4, int8}.
A block costs ``size·bits + 32`` bits per token (fp16 shift + scale) unless dropped, and
its error is measured by running the real quantizer on held-out calibration projections.
One DP pass at the largest budget yields the optimum for every smaller budget, so a whole
ladder of ratios comes out of a single run.

Block starts are aligned (size 1: any of the first 256 components; size 16: multiples of
16; larger: multiples of 64) to keep the error table and the DP small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .quantizer import BIT_WIDTHS, SIDE_BITS, squared_error

BLOCK_SIZES = (1, 16, 64, 256, 1024)
SINGLE_COMPONENT_LIMIT = 256
RANK_ALIGNMENT = 16


class Block(NamedTuple):
    start: int
    size: int
    bits: int

    @property
    def cost(self) -> int:
        """Bits per token this block costs."""
        return self.size * self.bits + SIDE_BITS if self.bits else 0


def _alignment(size: int) -> int:
    return 1 if size == 1 else min(size, 64)


def candidate_starts(size: int, rank: int) -> range:
    """Where a block of ``size`` may start among ``rank`` components."""
    stop = min(rank, SINGLE_COMPONENT_LIMIT) if size == 1 else rank - size + 1
    return range(0, max(stop, 0), _alignment(size))


@dataclass
class ErrorTable:
    """Mean squared error per token of every candidate (start, size, bits) block."""

    rank: int
    errors: dict[tuple[int, int], torch.Tensor]  # (size, bits) -> [len(candidate_starts)] fp64

    def error(self, block: Block) -> float:
        return float(self.errors[(block.size, block.bits)][block.start // _alignment(block.size)])


def measure_errors(projections: torch.Tensor, max_elements: int = 1 << 25) -> ErrorTable:
    """Simulate the quantizer on held-out projections ``[tokens, rank]`` for every candidate block."""
    tokens, rank = projections.shape
    rank -= rank % RANK_ALIGNMENT
    errors = {}
    for size in BLOCK_SIZES:
        starts = torch.tensor(list(candidate_starts(size, rank)), dtype=torch.long)
        per_call = max(1, max_elements // (tokens * size))
        for bits in BIT_WIDTHS:
            parts = []
            for first in range(0, len(starts), per_call):
                index = starts[first : first + per_call, None] + torch.arange(size)
                parts.append(squared_error(projections[:, index], bits) / tokens)
            errors[(size, bits)] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return ErrorTable(rank, errors)


def _transitions(table: ErrorTable, start: int):
    for size in BLOCK_SIZES:
        if start + size > table.rank or start % _alignment(size):
            continue
        if size == 1 and start >= SINGLE_COMPONENT_LIMIT:
            continue
        for bits in BIT_WIDTHS:
            block = Block(start, size, bits)
            yield block, table.error(block)


class BitAllocator:
    """The DP, run once up to ``max_budget`` bits per token.

    ``curve[b]`` is the least error reachable with at most ``b`` bits; :meth:`covering`
    backtracks the blocks (dropped ones included) that reach it.
    """

    def __init__(self, table: ErrorTable, max_budget: int):
        self.table = table
        inf = float("inf")
        best = {0: torch.full((max_budget + 1,), inf, dtype=torch.float64)}
        best[0][0] = 0.0
        self._choice: dict[int, torch.Tensor] = {}
        self._moves: dict[int, list[Block]] = {}
        for start in range(table.rank):
            source = best.pop(start, None)
            if source is None:
                continue
            for block, error in _transitions(table, start):
                if block.cost > max_budget:
                    continue
                end = start + block.size
                if end not in best:
                    best[end] = torch.full_like(source, inf)
                    self._choice[end] = torch.full((max_budget + 1,), -1, dtype=torch.int8)
                    self._moves[end] = []
                candidate = torch.full_like(source, inf)
                candidate[block.cost :] = source[: max_budget + 1 - block.cost] + error
                better = candidate < best[end]
                best[end] = torch.where(better, candidate, best[end])
                self._choice[end][better] = len(self._moves[end])
                self._moves[end].append(block)
        self._exact = best[table.rank]  # least error using exactly b bits
        self.curve = torch.cummin(self._exact, dim=0).values

    def covering(self, budget: int) -> list[Block]:
        """Blocks covering every component, of least error within ``budget`` bits per token."""
        end, bits = self.table.rank, int(torch.argmin(self._exact[: budget + 1]))
        blocks = []
        while end > 0:
            block = self._moves[end][int(self._choice[end][bits])]
            blocks.append(block)
            end -= block.size
            bits -= block.cost
        return blocks[::-1]


def allocate(table: ErrorTable, budgets: list[int]) -> list[list[Block]]:
    """For each per-token bit budget, the blocks (dropped ones included) of least total error."""
    allocator = BitAllocator(table, max(budgets))
    return [allocator.covering(b) for b in budgets]


def greedy_allocate(table: ErrorTable, budget: int, size: int = 64) -> list[Block]:
    """Baseline: fixed blocks, repeatedly widen the block with the best error drop per bit."""
    whole = table.rank - table.rank % size
    blocks = [Block(s, size, 0) for s in range(0, whole, size)]
    blocks += [Block(s, RANK_ALIGNMENT, 0) for s in range(whole, table.rank, RANK_ALIGNMENT)]
    used = 0
    while True:
        best_gain, best_index = 0.0, -1
        for i, block in enumerate(blocks):
            if block.bits == BIT_WIDTHS[-1]:
                continue
            wider = block._replace(bits=BIT_WIDTHS[BIT_WIDTHS.index(block.bits) + 1])
            extra = wider.cost - block.cost
            if used + extra > budget:
                continue
            gain = (table.error(block) - table.error(wider)) / extra
            if gain > best_gain:
                best_gain, best_index = gain, i
        if best_index < 0:
            return blocks
        wider = blocks[best_index]._replace(bits=BIT_WIDTHS[BIT_WIDTHS.index(blocks[best_index].bits) + 1])
        used += wider.cost - blocks[best_index].cost
        blocks[best_index] = wider


def plan_error(table: ErrorTable, covering: list[Block]) -> float:
    """Predicted mean squared error per token of a covering of all ``table.rank`` components."""
    return sum(table.error(block) for block in covering)
