"""The task suite's prompts and scores: what only the cache can answer, scored as the benchmarks score it."""

from __future__ import annotations

import pytest
import torch
from prepared import text

from benchmarks import task_suite, tasks

CONTEXT = 512


@pytest.fixture(scope="module")
def suite(tokenizer) -> dict[str, list[tasks.TaskPrompt]]:
    docs = text("kjv")
    return {name: make(tokenizer, docs, CONTEXT, 5, 3) for name, make in tasks.SUITE.items()}


def test_every_prompt_caches_whole_chunks_and_asks_in_the_uncached_rest(suite, tokenizer):
    for name, prompts in suite.items():
        assert len(prompts) == 5, name
        for p in prompts:
            assert p.task == name and p.cached.shape == (CONTEXT,) and p.rest.numel() > 0 and p.new_tokens > 0
    kv = suite["kv-retrieval"]
    assert [p.depth for p in kv] == list(tasks.DEPTHS)
    for p in kv:
        (value,) = p.answers
        key = tokenizer.decode(p.rest).split('Key: "')[1].split('"')[0]
        assert f'"{key}": "{value}"' in tokenizer.decode(p.cached) and value not in tokenizer.decode(p.rest)


def test_the_asked_pair_moves_through_the_cache_with_its_depth(suite, tokenizer):
    cached = [tokenizer.decode(p.cached) for p in suite["kv-retrieval"]]
    where = [c.index(p.answers[0]) for c, p in zip(cached, suite["kv-retrieval"], strict=True)]
    assert where == sorted(where) and where[-1] - where[0] > 0.7 * len(cached[0])


def test_needles_and_chains_sit_only_in_the_cached_part(suite, tokenizer):
    for name in ("variable-tracking", "multi-value-needle"):
        for p in suite[name]:
            cached, rest = tokenizer.decode(p.cached), tokenizer.decode(p.rest)
            assert all(a in cached and a not in rest for a in p.answers), name
    for p in suite["variable-tracking"]:
        positions = [tokenizer.decode(p.cached).index(f"VAR {a} =") for a in p.answers]
        assert positions == sorted(positions), "the chain is planted in its order"
    for p in suite["multi-value-needle"]:
        key = tokenizer.decode(p.rest).split("numbers for ")[1].split(" ")[0]
        assert tokenizer.decode(p.cached).count(f"numbers for {key} is") == len(p.answers) == 4


def test_choice_prompts_are_solved_examples_then_one_open_question(suite, tokenizer):
    for p in suite["many-shot-choice"]:
        whole = tokenizer.decode(torch.cat((p.cached, p.rest)))
        assert whole.count("Answer:") > 10 and whole.endswith("Answer:") and p.choice
        options = whole.rsplit("Question: Which of these is ", 1)[1].split(": ", 1)[1]
        assert p.answers[0] in options


def test_prompts_are_the_same_for_the_same_seed_and_differ_for_another(tokenizer):
    docs = text("kjv")
    a, b = (tasks.multi_value_needle(tokenizer, docs, CONTEXT, 2, seed=s) for s in (1, 1))
    c = tasks.multi_value_needle(tokenizer, docs, CONTEXT, 2, seed=2)
    assert all(torch.equal(x.cached, y.cached) and x.answers == y.answers for x, y in zip(a, b, strict=True))
    assert a[0].answers != c[0].answers


def test_scores_give_partial_credit_for_lists_and_none_for_a_wrong_choice():
    many = tasks.TaskPrompt("multi-value-needle", torch.zeros(1), torch.zeros(1), ("123", "456", "789", "1011"), 8)
    assert many.score(": 123, 456 and 1011") == 0.75 and many.score("nothing") == 0.0
    pick = tasks.TaskPrompt("many-shot-choice", torch.zeros(1), torch.zeros(1), ("apple",), 4, choice=True)
    assert pick.score(" apple\n\nQuestion") == 1.0 and pick.score(" taxi apple") == 0.0 and pick.score("") == 0.0


def test_one_forced_pass_scores_what_greedy_generation_would(qwen05):
    model, tokenizer = qwen05
    prompt = tasks.kv_retrieval(tokenizer, 256, 1)[0]
    kv, _ = task_suite.prefill(model, prompt.cached, logits_to_keep=1)
    generated = task_suite.greedy(model, kv, prompt.rest, prompt.target.numel())
    agrees = task_suite.forced_match(model, kv, prompt.rest, prompt.target)
    assert agrees == float(generated == prompt.target.tolist())
    assert task_suite.forced_match(model, kv, prompt.rest, torch.tensor(generated)) == 1.0


def test_generation_stops_once_more_tokens_cannot_change_the_score(tokenizer):
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    needle = tasks.TaskPrompt("multi-value-needle", torch.zeros(1), torch.zeros(1), ("1234567", "7654321"), 40)
    done = task_suite.answered(needle, tokenizer)
    assert not done(encode(": 1234567, 76543")) and done(encode(": 1234567, 7654321"))
    assert done(encode(": 99") + [tokenizer.eos_token_id])
    choice = task_suite.answered(tasks.TaskPrompt("many-shot-choice", torch.zeros(1), torch.zeros(1), ("pear",), 4,
                                                  choice=True), tokenizer)
    assert not choice(encode(" ")) and not choice(encode(" pe")) and choice(encode(" pear\n"))


def test_summary_pairs_each_method_with_bf16_and_counts_only_tasks_bf16_can_do():
    rows = []
    for prompt, (good, kvtc_score, mc) in enumerate([(1.0, 1.0, 0.0), (1.0, 0.0, 1.0), (0.0, 0.0, 0.0)]):
        for method, kind, ratio, score in (("bf16", "bf16", 1.0, good), ("kvtc ratio 16", "kvtc", 16.0, kvtc_score)):
            rows.append({"task": "kv-retrieval", "prompt": prompt, "method": method, "kind": kind,
                         "ratio_target": ratio, "stored_ratio": ratio, "score": score})
            rows.append({"task": "many-shot-choice", "prompt": prompt, "method": method, "kind": kind,
                         "ratio_target": ratio, "stored_ratio": ratio, "score": mc})
    summary = task_suite.summarize(rows)
    kvtc = next(s for s in summary if s["method"] == "kvtc ratio 16" and s["task"] == "kv-retrieval")
    assert kvtc["score"] == pytest.approx(1 / 3) and kvtc["delta"] == pytest.approx(-1 / 3)
    assert task_suite.counted_tasks(summary) == ["kv-retrieval"]  # bf16 1/3 on the choice: not above chance
    assert task_suite.largest_within(summary) is None
    assert "kvtc ratio 16 | 16.0× | 0.33 (Δ -0.33" in task_suite.markdown(
        {"summary": summary, "model": "m", "calibration": "c", "context": 512, "prompts": 3, "cpu": "x"})
