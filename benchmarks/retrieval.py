"""Passkey retrieval: a random 5-digit key planted at a depth of real held-out text, asked for at the end.

The needle always lands in the compressed region (between the attention sinks and the exact
recent window) and the question sits in the exact window, so a codec can only pass by
keeping the needle's keys and values intact enough for attention to find it again.

With ``keys > 1`` every prompt holds that many keys, each for a differently coloured door, at
random depths; one is asked for. Small models find a lone passkey even in a badly damaged
cache; telling near-identical needles apart takes sharper attention, so this variant
separates the rungs where the classic one saturates.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmcache_kvtc.calibrate.capture import prefill
from lmcache_kvtc.calibrate.metrics import greedy

INTRO = "There is an important piece of information hidden in the text below. Find it and remember it.\n\n"
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
DOORS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
DOOR_NEEDLE = "\n\nThe pass key of the {door} door is {key}. Remember it. {key} is the pass key of the {door} door.\n\n"
DOOR_QUESTION = "\n\nWhat is the pass key of the {door} door? The pass key of the {door} door is"
ANSWER_TOKENS = 8


@dataclass(frozen=True)
class Trial:
    ids: torch.Tensor  # the whole prompt, question included
    key: str
    depth: float  # where the needle asked for starts, as a fraction of the prompt
    needles: tuple[tuple[int, int], ...]  # token spans: the one asked for first, then the distractors

    @property
    def needle(self) -> tuple[int, int]:
        return self.needles[0]


def trials(tokenizer, docs: Sequence[str], context: int, depths: Sequence[float], per_depth: int,
           seed: int = 0, keys: int = 1) -> list[Trial]:
    """``per_depth`` prompts of exactly ``context`` tokens per depth, each with its own keys and filler.

    The key asked for starts at ``depth``; with ``keys > 1`` the distractors sit at random depths
    between 5 % and 90 % of the filler.
    """
    if not 1 <= keys <= len(DOORS):
        raise ValueError(f"keys must be between 1 and {len(DOORS)}, got {keys}")
    rng = random.Random(seed)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [tokenizer.bos_token_id] if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] else []
    filler: list[int] = []
    for doc in rng.sample(list(docs), len(docs)):
        filler += encode("\n\n" + doc)
        if len(filler) > 4 * context * per_depth * len(depths):
            break
    out, cursor = [], 0
    intro = encode(INTRO)
    for depth in depths:
        for _ in range(per_depth):
            # one key draws exactly as the classic test always did, so its prompts stay the same
            values = rng.sample(range(10_000, 100_000), keys) if keys > 1 else [rng.randrange(10_000, 100_000)]
            doors = rng.sample(DOORS, keys) if keys > 1 else [None]
            needles = [encode(_needle(door, str(key))) for door, key in zip(doors, values, strict=True)]
            question = encode(DOOR_QUESTION.format(door=doors[0]) if keys > 1 else QUESTION)
            body = context - len(bos) - len(intro) - sum(map(len, needles)) - len(question)
            if cursor + body > len(filler):
                cursor = 0
            text = filler[cursor : cursor + body]
            cursor += body
            distractors = [rng.randrange(body // 20, body * 9 // 10) for _ in needles[1:]]
            target = int(depth * (context - len(needles[0]))) - len(bos) - len(intro)
            for at, needle in sorted(zip(distractors, needles[1:], strict=True)):  # those before it shift it
                if at >= target:
                    break
                target -= len(needle)
            points = [min(max(target, 0), body), *distractors]
            ids, spans, done = bos + intro, {}, 0
            for at, i in sorted(zip(points, range(keys), strict=True)):
                ids += text[done:at]
                spans[i] = (len(ids), len(ids) + len(needles[i]))
                ids += needles[i]
                done = at
            ids += text[done:] + question
            out.append(Trial(torch.tensor(ids, dtype=torch.long), str(values[0]), depth,
                             tuple(spans[i] for i in range(keys))))
    return out


def _needle(door: str | None, key: str) -> str:
    return NEEDLE.format(key=key) if door is None else DOOR_NEEDLE.format(door=door, key=key)


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
