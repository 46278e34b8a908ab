"""The task suite's prompts: generated in code from offline text, scored the way their benchmarks score them.

Every prompt is a cached part of exactly ``context`` tokens (what LMCache stores: whole 256-token chunks) and an
uncached rest read on top of the restored cache, as a serving engine recomputes a prompt's last partial chunk. The
question sits in the rest; what it asks about sits in the cached part, so only a cache that kept it can answer.

- ``kv-retrieval`` (lost in the middle, Liu et al. 2023): a JSON object of random UUID pairs; the value of the key
  at a given depth, 36 characters copied exactly from one position of the cache.
- ``variable-tracking`` (RULER): a chain ``VAR A = 12345``, ``VAR B = VAR A``, … spread over held-out prose; the
  share of the chain's variables named (RULER's score).
- ``multi-value-needle`` (RULER's multi-key and multi-value needles): four numbers for one key and one for each of
  three other keys, at random depths of held-out prose; the share of the asked key's numbers given.
- ``many-shot-choice``: solved four-way questions ("Which of these is a fruit?") fill the cache, one more is answered
  by naming it: in-context learning from a cached prefix (chance 25 %). BIG-bench's JSON tasks, the issue's first
  choice, left PyPI with the ``bigbench`` sdist.
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

#: where the asked pair sits among the pairs of the cached part, in turn
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
KV_INTRO = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"
KV_QUESTION = '\n}}\n\nKey: "{key}"\nCorresponding value: "'
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = ("\n\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
               "According to the chain(s) of variable assignment in the text above, {n} variables are assigned the "
               "value {value}, they are:")
NEEDLE_INTRO = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n\n"
NEEDLE = " One of the special magic numbers for {key} is: {value}. "
NEEDLE_QUESTION = ("\n\nWhat are all the special magic numbers for {key} mentioned in the provided text? The special "
                   "magic numbers for {key} mentioned in the provided text are")
CHOICE_INTRO = "Answer each question with the right choice.\n\n"
CHOICE = "Question: Which of these is {kind}: {0}, {1}, {2} or {3}?\nAnswer:"
#: what a word of each category is called in a question, and the words (no word fits two categories)
CATEGORIES = {
    "a fruit": "apple banana cherry grape lemon mango peach pear plum melon apricot kiwi papaya lime",
    "an animal": "horse tiger rabbit eagle salmon donkey zebra wolf camel otter goat lizard beaver falcon moose",
    "a colour": "red blue green yellow purple brown black white pink gray violet crimson scarlet turquoise beige",
    "a country": "France Brazil Japan Kenya Canada Norway Egypt Chile India Spain Peru Mexico Poland Greece Turkey",
    "a tool": "hammer wrench saw drill chisel pliers screwdriver shovel axe rake trowel ladder clamp sander anvil",
    "a musical instrument": "violin piano guitar flute trumpet drum cello harp oboe clarinet banjo tuba saxophone",
    "a vehicle": "bicycle truck bus tractor scooter van motorcycle tram train taxi ambulance jeep wagon lorry",
    "a number": "seven twelve forty nine three eighty fifteen six ninety eleven twenty eight thirteen sixty",
    "a profession": "doctor teacher lawyer farmer pilot nurse baker plumber carpenter dentist chef judge sailor tailor",
    "a part of the body": "elbow knee shoulder ankle wrist finger liver lung ear nose chin thumb heel spine",
}
KEY_WORDS = ("amber", "brisk", "cobalt", "dusty", "eager", "frosty", "gentle", "hollow", "ivory", "jolly", "keen",
             "lunar", "mellow", "noble", "olive", "proud", "quiet", "rustic", "silent", "tidy")
KEY_NOUNS = ("anchor", "basket", "candle", "dolphin", "engine", "feather", "garden", "harbor", "island", "jacket",
             "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "ribbon", "saddle", "tunnel")


@dataclass(frozen=True)
class TaskPrompt:
    task: str
    cached: torch.Tensor  # exactly ``context`` ids: what LMCache stores
    rest: torch.Tensor  # the uncached rest of the prompt, the question included
    answers: tuple[str, ...]
    new_tokens: int
    depth: float | None = None  # where the asked item sits in the cached part, as a fraction
    choice: bool = False  # answered by naming one choice: the answer's first word must be ``answers[0]``
    #: the answer's ids where it has one form: greedy decoding starts with it iff every teacher-forced argmax
    #: matches it, so one forward pass scores the prompt (1 or 0) instead of a token-by-token generation
    target: torch.Tensor | None = None

    def score(self, output: str) -> float:
        """Scored as the benchmark scores it: 1 if the choice is named first, else the share of the expected
        strings found in the output (RULER's ``string_match_all``; one string: 1 or 0)."""
        if self.choice:
            return float(output.split()[:1] == [self.answers[0]])
        return sum(a in output for a in self.answers) / len(self.answers)


class _Prompts:
    """Token-level assembly shared by the tasks: a tokenizer, its BOS, and a stream of held-out filler."""

    def __init__(self, tokenizer, context: int, filler_docs: Sequence[str] = (), seed: int = 0):
        self.tokenizer, self.context = tokenizer, context
        self.rng = random.Random(seed)
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []
        self._docs = list(filler_docs)
        self._filler: list[int] = []

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def filler(self, tokens: int) -> list[int]:
        """The next ``tokens`` ids of held-out text (documents in seeded order, never the same span twice)."""
        while len(self._filler) < tokens:
            if not self._docs:
                raise ValueError("no held-out documents to fill the prompts with")
            self._filler += self.encode("\n\n" + self._docs.pop(self.rng.randrange(len(self._docs))))
        out, self._filler = self._filler[:tokens], self._filler[tokens:]
        return out

    def planted(self, intro: str, needles: list[list[int]], ordered: bool = False) -> list[int]:
        """``bos + intro`` and filler with ``needles`` spliced in at random depths (in the given order if
        ``ordered``): exactly ``context`` ids."""
        head = self.bos + self.encode(intro)
        body = self.context - len(head) - sum(map(len, needles))
        text = self.filler(body)
        points = [self.rng.randrange(body // 20, body * 19 // 20) for _ in needles]
        if ordered:
            points.sort()
        ids, done = list(head), 0
        for at, i in sorted(zip(points, range(len(needles)), strict=True)):
            ids += text[done:at] + needles[i]
            done = at
        return ids + text[done:]

    def prompt(self, task: str, cached: list[int], rest: list[int], answers: Sequence[str], new_tokens: int,
               depth: float | None = None, choice: bool = False, target: str | None = None) -> TaskPrompt:
        if len(cached) != self.context or not rest:
            raise ValueError(f"{task}: {len(cached)} cached ids (want {self.context}) and {len(rest)} more")
        as_tensor = lambda ids: torch.tensor(ids, dtype=torch.long)  # noqa: E731
        return TaskPrompt(task, as_tensor(cached), as_tensor(rest), tuple(answers), new_tokens, depth, choice,
                          None if target is None else as_tensor(self.encode(target)))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def kv_retrieval(tokenizer, context: int, n: int, depths: Sequence[float] = DEPTHS, seed: int = 0) -> list[TaskPrompt]:
    """``n`` prompts, UUID pairs past the cached part; the asked pair at ``depths`` (in turn) of those wholly
    inside it."""
    p = _Prompts(tokenizer, context, seed=seed)
    out = []
    for i in range(n):
        depth = depths[i % len(depths)]
        ids, pairs, ends = p.bos + p.encode(KV_INTRO), [], []
        while len(ids) <= context:
            pairs.append((_uuid(p.rng), _uuid(p.rng)))
            ids += p.encode('\n  "{}": "{}",'.format(*pairs[-1]))
            ends.append(len(ids))
        inside = sum(end <= context for end in ends)
        key, value = pairs[round(depth * (inside - 1))]
        ids += p.encode(KV_QUESTION.format(key=key))
        out.append(p.prompt("kv-retrieval", ids[:context], ids[context:], [value], len(p.encode(value)) + 2, depth,
                            target=value))
    return out


def variable_tracking(tokenizer, docs: Sequence[str], context: int, n: int, hops: int = 2,
                      seed: int = 0) -> list[TaskPrompt]:
    """``n`` prompts, each one chain of ``hops`` assignments after the first, in order at random depths."""
    p = _Prompts(tokenizer, context, docs, seed)
    out = []
    for _ in range(n):
        names = ["".join(p.rng.choices(string.ascii_uppercase, k=5)) for _ in range(hops + 1)]
        value = p.rng.randrange(10_000, 100_000)
        chain = [f" VAR {names[0]} = {value}. "] + [f" VAR {b} = VAR {a}. " for a, b in pairwise(names)]
        cached = p.planted(VT_INTRO, [p.encode(s) for s in chain], ordered=True)
        rest = p.encode(VT_QUESTION.format(value=value, n=hops + 1))
        out.append(p.prompt("variable-tracking", cached, rest, names, 6 * (hops + 1) + 4))
    return out


def multi_value_needle(tokenizer, docs: Sequence[str], context: int, n: int, values: int = 4, distractors: int = 3,
                       seed: int = 0) -> list[TaskPrompt]:
    """``n`` prompts: ``values`` numbers for the asked key and one for each of ``distractors`` other keys."""
    p = _Prompts(tokenizer, context, docs, seed)
    out = []
    for _ in range(n):
        keys = [f"{a}-{b}" for a, b in zip(p.rng.sample(KEY_WORDS, distractors + 1),
                                           p.rng.sample(KEY_NOUNS, distractors + 1), strict=True)]
        numbers = [str(v) for v in p.rng.sample(range(1_000_000, 10_000_000), values + distractors)]
        owners = [keys[0]] * values + keys[1:]
        cached = p.planted(NEEDLE_INTRO, [p.encode(NEEDLE.format(key=k, value=v))
                                             for k, v in zip(owners, numbers, strict=True)])
        rest = p.encode(NEEDLE_QUESTION.format(key=keys[0]))
        out.append(p.prompt("multi-value-needle", cached, rest, numbers[:values], 12 * values + 8))
    return out


def _choice_questions(rng: random.Random) -> Iterator[tuple[str, str]]:
    """Endless ``(question text, answer)``: one word of a category among three of three other categories."""
    kinds = list(CATEGORIES)
    while True:
        kind, *others = rng.sample(kinds, 4)
        words = [rng.choice(CATEGORIES[kind].split())] + [rng.choice(CATEGORIES[o].split()) for o in others]
        yield CHOICE.format(*rng.sample(words, 4), kind=kind), words[0]


def many_shot_choice(tokenizer, context: int, n: int, seed: int = 0) -> list[TaskPrompt]:
    """``n`` prompts: solved questions past the cached part, then one to answer."""
    p = _Prompts(tokenizer, context, seed=seed)
    questions = _choice_questions(p.rng)
    out = []
    for _ in range(n):
        ids = p.bos + p.encode(CHOICE_INTRO)
        while len(ids) <= context:
            text, answer = next(questions)
            ids += p.encode(f"{text} {answer}\n\n")
        text, answer = next(questions)
        ids += p.encode(text)
        out.append(p.prompt("many-shot-choice", ids[:context], ids[context:], [answer], 4, choice=True,
                            target=f" {answer}"))
    return out


#: the suite: task name -> ``(tokenizer, held-out docs, context, prompts per task, seed) -> prompts``
SUITE: dict[str, Callable[..., list[TaskPrompt]]] = {
    "kv-retrieval": lambda tok, docs, context, n, seed: kv_retrieval(tok, context, n, seed=seed),
    "variable-tracking": lambda tok, docs, context, n, seed: variable_tracking(tok, docs, context, n, seed=seed),
    "multi-value-needle": lambda tok, docs, context, n, seed: multi_value_needle(tok, docs, context, n, seed=seed),
    "many-shot-choice": lambda tok, docs, context, n, seed: many_shot_choice(tok, context, n, seed),
}
