"""Passkey retrieval: a random 5-digit key planted at a depth of real held-out text, asked for at the end.

The needle always lands in the compressed region (between the attention sinks and the exact
recent window) and the question sits in the exact window, so a codec can only pass by
keeping the needle's keys and values intact enough for attention to find it again.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from calibration.kv_capture import prefill
from calibration.metrics import greedy

INTRO = "There is an important piece of information hidden in the text below. Find it and remember it.\n\n"
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8


@dataclass(frozen=True)
class Trial:
    ids: torch.Tensor  # the whole prompt, question included
    key: str
    depth: float  # where the needle starts, as a fraction of the prompt
    needle: tuple[int, int]  # its token span


def trials(tokenizer, docs: Sequence[str], context: int, depths: Sequence[float], per_depth: int,
           seed: int = 0) -> list[Trial]:
    """``per_depth`` prompts of exactly ``context`` tokens per depth, each with its own key and filler."""
    rng = random.Random(seed)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [tokenizer.bos_token_id] if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] else []
    filler: list[int] = []
    for doc in rng.sample(list(docs), len(docs)):
        filler += encode("\n\n" + doc)
        if len(filler) > 4 * context * per_depth * len(depths):
            break
    out, cursor = [], 0
    for depth in depths:
        for _ in range(per_depth):
            key = str(rng.randrange(10_000, 100_000))
            intro, needle, question = encode(INTRO), encode(NEEDLE.format(key=key)), encode(QUESTION)
            body = context - len(bos) - len(intro) - len(needle) - len(question)
            if cursor + body > len(filler):
                cursor = 0
            text = filler[cursor : cursor + body]
            cursor += body
            at = int(depth * (context - len(needle))) - len(bos) - len(intro)
            at = min(max(at, 0), body)
            head = bos + intro + text[:at]
            ids = head + needle + text[at:] + question
            out.append(Trial(torch.tensor(ids, dtype=torch.long), key, depth, (len(head), len(head) + len(needle))))
    return out


def answer(model, tokenizer, kv: torch.Tensor, last_token: torch.Tensor) -> str:
    """The model's greedy answer after the prompt whose cache (all but the last token) is ``kv``."""
    return tokenizer.decode(greedy(model, kv, last_token, ANSWER_TOKENS))


def run(model, tokenizer, trial_list: Sequence[Trial],
        restorers: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> dict[str, dict]:
    """Accuracy per method and depth; ``restorers`` map a cache to its reconstruction (``"bf16"`` = none)."""
    hits: dict[str, dict[float, list[bool]]] = {}
    for trial in trial_list:
        kv, _ = prefill(model, trial.ids[:-1], logits_to_keep=1)
        for name, restore in {"bf16": lambda kv: kv, **restorers}.items():
            text = answer(model, tokenizer, restore(kv), trial.ids[-1])
            hits.setdefault(name, {}).setdefault(trial.depth, []).append(trial.key in text)
    return {
        name: {
            "accuracy": sum(sum(v) for v in by_depth.values()) / sum(len(v) for v in by_depth.values()),
            "by_depth": {f"{d:g}": sum(v) / len(v) for d, v in sorted(by_depth.items())},
        }
        for name, by_depth in hits.items()
    }
