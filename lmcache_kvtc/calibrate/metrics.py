"""How much a restored KV cache changes the model: teacher-forced ΔNLL, KL, top-1 agreement."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .capture import cache_from_kv


@torch.inference_mode()
def continuation_logits(model, kv: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[M, vocab]`` of ``continuation`` read on top of the cache ``kv``."""
    cache = cache_from_kv(kv.to(model.device, model.dtype), model.config.get_text_config(decoder=True))
    ids = continuation.view(1, -1).to(model.device)
    return model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0].float()


def compare_logits(reference: torch.Tensor, test: torch.Tensor, continuation: torch.Tensor) -> dict[str, float]:
    """ΔNLL of the continuation's next tokens, KL(reference ‖ test) and top-1 agreement, per token."""
    targets = continuation[1:].to(reference.device)
    nll_ref = F.cross_entropy(reference[:-1], targets)
    nll_test = F.cross_entropy(test[:-1], targets)
    log_ref, log_test = reference.log_softmax(-1), test.log_softmax(-1)
    kl = (log_ref.exp() * (log_ref - log_test)).sum(-1).mean()
    top1 = (reference.argmax(-1) == test.argmax(-1)).float().mean()
    return {"nll": float(nll_ref), "delta_nll": float(nll_test - nll_ref), "kl": float(kl), "top1": float(top1)}


@torch.inference_mode()
def greedy(model, kv: torch.Tensor, first: torch.Tensor, steps: int,
           done: Callable[[list[int]], bool] | None = None) -> list[int]:
    """Up to ``steps`` greedy tokens after feeding ``first`` (one token id, or the uncached rest of a prompt) on
    top of ``kv``; fewer once ``done(tokens so far)`` says the answer is complete."""
    cache = cache_from_kv(kv, model.config.get_text_config(decoder=True))
    token = first.view(1, -1).to(model.device)
    out: list[int] = []
    while len(out) < steps and not (done and out and done(out)):
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[0, -1]
        token = logits.argmax().view(1, 1)
        out.append(int(token))
    return out


def relative_error(reference: torch.Tensor, test: torch.Tensor) -> float:
    """‖test − reference‖ / ‖reference‖ in fp32."""
    reference = reference.float()
    return float((test.float() - reference).norm() / reference.norm())
