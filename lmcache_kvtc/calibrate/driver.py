"""Calibration driver: a transformers decoder LM + text -> KVTC calibration file (+ report with plots).

Each context is prefilled once; its KV cache minus the attention sinks and the recent
window becomes per-token feature vectors (keys de-rotated with the model's own RoPE, checked exact on the
first held-out context before anything is fitted: :mod:`.architecture`). The
last contexts are held out: the quantizer's bytes and error are measured on them, and — with
``key_weight="auto"`` — the model's own next-token KL on their last tokens picks how the
bit budget is split between keys and values. Nothing held out is used to fit the PCA.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..calibration import Calibration, StreamBasis
from ..codec import KVTCCodec, token_features
from ..defaults import CALIBRATION_CONTEXT, CALIBRATION_TOKENS, SINKS, WINDOW
from ..rope import RopeTable
from . import tensor_parallel
from .architecture import check_architecture, verified_rope_table
from .capture import fastest_dtype, kv_dims, prefill
from .contexts import token_contexts
from .fitting import DEFAULT_RATIOS, Planner, add_batch, assemble
from .metrics import compare_logits, continuation_logits

log = logging.getLogger(__name__)

#: what captured KV is rounded to, whatever the model computes in: what vLLM caches
KV_DTYPE = torch.bfloat16
MAX_HELDOUT_TOKENS = 4096
ROPE_CHECK_TOKENS = 1024
#: K/V splits ``key_weight="auto"`` tries (16 was also tried until 0.3: it lost to both at every ratio and
#: normalization on Qwen2.5-Coder-0.5B, and each candidate costs a sixth of the tuning)
KEY_WEIGHT_CANDIDATES = (None, 64.0)
NORMALIZATIONS = ("none", "layer")
TUNING_RATIOS = (8.0, 16.0, 32.0)
TUNING_CONTINUATION = 256


def load_model(directory: str | Path, dtype: torch.dtype = torch.bfloat16, attn_implementation: str | None = None):
    """``(model, tokenizer)`` of a local Hugging Face model directory (never downloads), the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn_implementation,
                                                  local_files_only=True).eval()
    return loaded, AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _features(kv: torch.Tensor, rope) -> torch.Tensor:
    """On ``kv``'s device: a GPU capture de-rotates and accumulates there."""
    tokens = kv.shape[2]
    keep = slice(SINKS, tokens - WINDOW)
    return token_features(kv[:, :, keep], torch.arange(tokens, device=kv.device)[keep], rope)


@dataclass
class Capture:
    """What one pass over the calibration contexts yields, per RoPE table the features were taken with."""

    heldout_kv: list[torch.Tensor]  # full caches of the held-out contexts (host memory)
    heldout: dict[str, torch.Tensor]  # [2, ≤MAX_HELDOUT_TOKENS, p] held-out features (host memory)
    covariances: dict[str, dict]  # streaming moments of the fit features (FeatureCovariance/SketchedCovariance)


def capture(lm, fit_ids: Sequence[torch.Tensor], heldout_ids: Sequence[torch.Tensor],
            ropes: dict[str, RopeTable], desc: str, max_rank: int | None = None) -> Capture:
    """Prefill every context once (on the model's device); take features with each of ``ropes`` (ablations use
    several). ``max_rank``: see :func:`.fitting.new_accumulator`."""
    progress = tqdm(total=len(fit_ids) + len(heldout_ids), desc=desc, unit="ctx")
    heldout_kv = []
    for ids in heldout_ids:
        heldout_kv.append(prefill(lm, ids, logits_to_keep=1)[0].to("cpu", KV_DTYPE))
        progress.update()
    heldout = {}
    for name, rope in ropes.items():
        features = torch.cat([_features(kv, rope) for kv in heldout_kv], dim=1)
        if features.shape[1] > MAX_HELDOUT_TOKENS:
            pick = torch.randperm(features.shape[1], generator=torch.Generator().manual_seed(0))[:MAX_HELDOUT_TOKENS]
            features = features[:, pick.sort().values]
        heldout[name] = features
    covariances: dict[str, dict] = {name: {} for name in ropes}
    for ids in fit_ids:
        kv = prefill(lm, ids, logits_to_keep=1)[0].to(KV_DTYPE)
        for name, rope in ropes.items():
            add_batch(covariances[name], _features(kv, rope), max_rank)
        progress.update()
    progress.close()
    return Capture(heldout_kv, heldout, covariances)


def split_contexts(tokenizer, documents: Sequence[str], tokens: int, context: int,
                   heldout_contexts: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(fit, held-out)`` token contexts cut from ``documents``; the held-out ones come last."""
    n_contexts = max(tokens // context, heldout_contexts + 1)
    contexts = token_contexts(tokenizer, documents, n_contexts, context)
    return contexts[:-heldout_contexts], contexts[-heldout_contexts:]


def calibrate(
    model: str | tuple,
    documents: Sequence[str],
    tokens: int = CALIBRATION_TOKENS,
    context: int = CALIBRATION_CONTEXT,
    heldout_contexts: int = 3,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    out: str | Path | None = None,
    source: str = "custom text",
    key_weight: float | None | str = "auto",
    normalize: str = "auto",
    tp_sizes: Sequence[int] = (),
    device: str = "cpu",
    max_rank: int | None = None,
) -> Calibration:
    """Calibrate ``model`` (a Hugging Face model directory, or ``(name, model, tokenizer)``) on ``tokens`` tokens
    of ``documents`` cut into contexts of ``context`` tokens.

    ``key_weight``: ``None`` splits the bit budget evenly between K and V; a number weighs
    the keys' relative error against the values'. ``normalize``: ``"none"`` fits the PCA to
    the raw features; ``"layer"`` first scales every layer to unit energy (see
    :class:`~lmcache_kvtc.calibration.StreamBasis`). ``"auto"`` (either) tries the choices and
    keeps the one with the lowest next-token KL on held-out calibration contexts.

    ``tp_sizes`` (e.g. ``(2, 4)``): ``out`` is then a directory that receives one calibration per tensor-parallel
    size and rank, fitted from the same capture on the KV heads vLLM gives that rank, and the ``index.json`` the
    serde selects them with (:mod:`.tensor_parallel`). The whole model's calibration is returned either way.

    ``device``: where the model prefills and the covariance is accumulated and decomposed (``"cuda"`` on a GPU);
    the rate–distortion curves are measured on the CPU coder either way. ``max_rank``: components the fit keeps
    (default: every one up to :data:`.fitting.EXACT_MAX_FEATURES` features, else a sketch of
    :data:`.fitting.SKETCH_RANK`; see :func:`.fitting.new_accumulator`).
    """
    started = time.time()
    if isinstance(model, tuple):
        model, lm, tokenizer = model
    else:
        lm, tokenizer = load_model(model, dtype=fastest_dtype(device))
    lm = lm.to(device)
    check_architecture(lm.config)
    layers, kv_heads, head_dim = kv_dims(lm.config)
    for size in tp_sizes:  # a size vLLM cannot shard this model over fails before anything is prefilled
        tensor_parallel.rank_heads(kv_heads, size, 0)
    fit_ids, heldout_ids = split_contexts(tokenizer, documents, tokens, context, heldout_contexts)
    rope = verified_rope_table(lm, heldout_ids[0][:ROPE_CHECK_TOKENS])
    data = capture(lm, fit_ids, heldout_ids, {"model": rope}, desc=f"calibrating {model}", max_rank=max_rank)
    captured = time.time()
    heldout, heldout_kv = data.heldout["model"], data.heldout_kv
    normalizations = NORMALIZATIONS if normalize == "auto" else (normalize,)
    weights = KEY_WEIGHT_CANDIDATES if key_weight == "auto" else (key_weight,)
    planners = {  # the longest silent stage on a big model (1.5B on 2 cores: ~10 min per normalization)
        n: Planner(fit_streams(data.covariances["model"], n, layers), heldout, min(ratios))
        for n in tqdm(normalizations, desc="fitting PCA and rate-distortion curves", unit="normalization")
    }
    model_id = Path(model).name if Path(model).is_dir() else model
    shape = {"model_id": model_id, "kv_heads": kv_heads, "head_dim": head_dim, "rope": rope}
    candidates = [(n, w) for n in normalizations for w in weights]
    tuning = None
    if len(candidates) > 1:
        (normalize, key_weight), tuning = _tune(lm, planners, shape, candidates, heldout_kv, heldout_ids, ratios)
    else:
        (normalize, key_weight), = candidates
    planner = planners[normalize]
    seconds = {"capture": round(captured - started, 1), "fit_and_tuning": round(time.time() - captured, 1)}
    info = {
        "model": model,
        "source": source,
        "contexts": len(fit_ids) + len(heldout_ids),
        "context_tokens": context,
        "heldout_contexts": heldout_contexts,
        "fit_tokens": len(fit_ids) * (context - SINKS - WINDOW),
        "heldout_tokens": int(heldout.shape[1]),
        "sinks_excluded": SINKS,
        "window_excluded": WINDOW,
        "rope_parameters": str(getattr(lm.config, "rope_parameters", None)),
        "fit": type(data.covariances["model"]["keys"]).__name__,
        "capture_dtype": str(lm.dtype).removeprefix("torch."),
        "normalize": normalize,
        "key_weight": key_weight,
        "tuning": tuning,
        "heldout_energy": planner.energy,
        "stage_seconds": seconds,
    }
    calibration = assemble(**shape, streams=planner.streams, plans=planner.plans(ratios, key_weight), info=info)
    calibration.info["seconds"] = round(time.time() - started, 1)
    if calibration.layers != layers:
        raise RuntimeError(f"RoPE table has {calibration.layers} layers, the model {layers}")
    if out is not None and tp_sizes:
        save_ranks(calibration, data.covariances["model"], heldout, tp_sizes, Path(out))
    elif out is not None:
        from .report import write_report

        calibration.save(out)
        report = write_report(calibration, Path(out).with_suffix(".report"))
        log.info("wrote %s (fingerprint %s) and %s", out, calibration.fingerprint.hex(), report)
    return calibration


def save_ranks(whole: Calibration, covariances: dict, heldout: torch.Tensor,
               tp_sizes: Sequence[int], directory: Path) -> Path:
    """One calibration per (tensor-parallel size, rank) in ``directory`` plus its ``index.json``; the fit choices
    (normalization, K/V split) are the whole model's; ranks that cache the same heads share one fit."""
    directory.mkdir(parents=True, exist_ok=True)
    normalize, key_weight = whole.info["normalize"], whole.info["key_weight"]
    fits: dict[range, Calibration] = {}
    ranks = [(size, rank) for size in sorted(set(tp_sizes)) for rank in range(size)]
    for size, rank in tqdm(ranks, desc="fitting tensor-parallel ranks"):
        heads = tensor_parallel.rank_heads(whole.kv_heads, size, rank)
        if heads not in fits:
            index = tensor_parallel.feature_index(whole.layers, whole.kv_heads, whole.head_dim, heads)
            streams = fit_streams({s: c.subset(index) for s, c in covariances.items()}, normalize, whole.layers)
            planner = Planner(streams, heldout[:, :, index], min(whole.ratios))
            info = {**whole.info, "kv_heads_of_model": whole.kv_heads, "heads": [heads.start, heads.stop],
                    "heldout_energy": planner.energy}
            fits[heads] = assemble(model_id=whole.model_id, kv_heads=len(heads), head_dim=whole.head_dim,
                                   rope=whole.rope, streams=planner.streams,
                                   plans=planner.plans(whole.ratios, key_weight), info=info)
        calibration = dataclasses.replace(fits[heads], info={**fits[heads].info, "tp_size": size, "tp_rank": rank})
        calibration.save(directory / tensor_parallel.file_name(whole.model_id, size, rank))
    index = tensor_parallel.write_index(directory, whole.model_id, ranks)
    log.info("wrote %d rank calibrations and %s", len(ranks), index)
    return index


def fit_streams(covariances: dict, normalize: str, layers: int) -> dict[str, StreamBasis]:
    """PCA per stream, of raw features (``"none"``) or of features scaled per layer (``"layer"``)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS} or 'auto', got {normalize!r}")
    return {s: c.pca(scale=c.layer_scale(layers) if normalize == "layer" else None) for s, c in covariances.items()}


def _tune(lm, planners: dict[str, Planner], shape: dict, candidates, kvs, ids_list, ratios):
    """Pick the (normalization, K/V split) with the lowest mean log-KL of the model's next-token distributions."""
    ratios = [r for r in ratios if r in TUNING_RATIOS] or list(ratios)
    cases = []
    for kv, ids in zip(kvs[:2], ids_list[:2], strict=False):
        cut = kv.shape[2] - TUNING_CONTINUATION
        prefix, continuation = kv[:, :, :cut].contiguous(), ids[cut:]
        cases.append((prefix, continuation, continuation_logits(lm, prefix, continuation)))
    scores: dict[str, dict[str, float]] = {}
    for normalize, weight in tqdm(candidates, desc="tuning normalization and K/V bit split"):
        planner = planners[normalize]
        candidate = assemble(**shape, streams=planner.streams, plans=planner.plans(ratios, weight))
        kls = {}
        for ratio in ratios:
            codec, plan = KVTCCodec(candidate), candidate.plan_index(ratio)
            kls[str(ratio)] = sum(
                compare_logits(reference, continuation_logits(lm, codec.decode(codec.encode(prefix, plan=plan)), cont),
                               cont)["kl"]
                for prefix, cont, reference in cases
            ) / len(cases)
        scores[_label(normalize, weight)] = kls
    best = min(candidates, key=lambda c: sum(math.log(k + 1e-6) for k in scores[_label(*c)].values()))
    log.info("chose normalize=%s key_weight=%s (mean KL per ratio for each candidate: %s)", *best, scores)
    return best, scores


def _label(normalize: str, key_weight: float | None) -> str:
    return f"normalize={normalize} key_weight={key_weight}"
