"""Per-rank calibrations for tensor-parallel vLLM: which KV heads a rank caches, and the index that finds its file.

With ``--tensor-parallel-size N`` each vLLM worker caches only its share of the KV heads, so its LMCache objects are
``[2, L, T, H_rank·D]`` and need a calibration of exactly those heads. vLLM's ``QKVParallelLinear`` gives rank ``r``
the contiguous heads ``[s·n, (s+1)·n)`` with ``n = H / N`` and ``s = r``; when ``N > H`` every head is replicated on
``N / H`` ranks (``n = 1``, ``s = r // (N / H)``). A rank's features are a subset of the full model's, so every rank
is fitted from the one capture: its covariance is a sub-block of the full one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CalibrationError

INDEX_FILE = "index.json"  # the name lmcache_kvtc.lmcache.selection looks for


def rank_heads(kv_heads: int, tp_size: int, tp_rank: int) -> range:
    """The model's KV heads that vLLM rank ``tp_rank`` of ``tp_size`` caches (its ``QKVParallelLinear`` sharding)."""
    if not 0 <= tp_rank < tp_size:
        raise CalibrationError(f"tp_rank {tp_rank} is not a rank of tp_size {tp_size}")
    if tp_size >= kv_heads:
        if tp_size % kv_heads:
            raise CalibrationError(f"vLLM needs tp_size {tp_size} to be a multiple of the {kv_heads} KV heads")
        head = tp_rank // (tp_size // kv_heads)
        return range(head, head + 1)
    if kv_heads % tp_size:
        raise CalibrationError(f"vLLM needs the {kv_heads} KV heads to divide evenly over tp_size {tp_size}")
    per_rank = kv_heads // tp_size
    return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)


def feature_index(layers: int, kv_heads: int, head_dim: int, heads: range) -> torch.Tensor:
    """Positions of ``heads`` in a token's feature vector ``[layers, kv_heads, head_dim]`` (flattened)."""
    index = torch.arange(layers * kv_heads * head_dim).reshape(layers, kv_heads, head_dim)
    return index[:, heads.start : heads.stop].reshape(-1)


def file_name(model_id: str, tp_size: int, tp_rank: int) -> str:
    return f"{model_id}.tp{tp_size}.rank{tp_rank}.safetensors"


def write_index(directory: Path, model_id: str, ranks: list[tuple[int, int]]) -> Path:
    """``index.json`` naming each ``(tp_size, tp_rank)`` file, so the serde's ``"calibration": DIR`` picks the
    file of every object from its ``kv_rank``. Entries name no ``model_name``: vLLM's served name is rarely the
    checkpoint directory's, so the directory stands for one model (add ``model_name`` to share it)."""
    entries = [{"file": file_name(model_id, size, rank), "tp_size": size, "tp_rank": rank} for size, rank in ranks]
    path = Path(directory) / INDEX_FILE
    path.write_text(json.dumps({"calibrations": entries}, indent=2) + "\n", encoding="utf-8")
    return path
