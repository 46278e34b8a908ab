"""Cut documents into fixed-length token contexts for calibration and evaluation."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase


def token_contexts(
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[str],
    n_contexts: int,
    tokens: int,
    seed: int = 0,
    add_bos: bool | None = None,
) -> list[torch.Tensor]:
    """``n_contexts`` 1-D int64 tensors of exactly ``tokens`` ids, deterministic in ``(docs, seed)``.

    Documents are visited in a seeded random order and concatenated with ``"\\n\\n"``; the token stream is cut
    into consecutive non-overlapping windows, so contexts never share tokens.  With a BOS token every context
    starts with it and holds ``tokens - 1`` text tokens; ``add_bos=None`` does what the tokenizer does by default
    (Gemma prepends ``<bos>`` and needs it; Qwen adds nothing).  Raises if the documents are too short.
    """
    if tokens < 2 or n_contexts < 1:
        raise ValueError("need tokens >= 2 and n_contexts >= 1")
    bos = tokenizer.bos_token_id
    if add_bos is None and bos is not None:
        add_bos = tokenizer("a")["input_ids"][:1] == [bos]
    if not add_bos:
        bos = None
    body = tokens - (1 if bos is not None else 0)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    need = n_contexts * body
    stream: list[int] = []
    for i, idx in enumerate(order):
        text = docs[idx] if i == 0 else "\n\n" + docs[idx]
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"documents give {len(stream)} tokens, need {need} ({n_contexts} x {body})")
    out: list[torch.Tensor] = []
    for c in range(n_contexts):
        ids = stream[c * body:(c + 1) * body]
        if bos is not None:
            ids = [bos, *ids]
        out.append(torch.tensor(ids, dtype=torch.long))
    return out
