"""A real vLLM-CPU serves requests from KVTC-compressed caches through a real LMCache MP server.

vLLM-CPU runs in its own environment (``.venv-vllm``, built by ``.ci/setup``): it pins
``transformers<5.20`` while the project's calibration tools use 5.24. The tests drive it, and the MP
server from the same environment, as real processes; redis-server is real too.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess

import pytest
import torch
from lmcache_helpers import stored_files
from prepared import text, vllm_python

from benchmarks.vllm_processes import REPO, MPServer, Pid, VLLMDriver, free_port, pids_of, vllm_env
from calibration import models
from lmcache_kvtc import Calibration
from lmcache_kvtc.calibrate.tensor_parallel import file_name
from lmcache_kvtc.errors import UnsupportedLayoutError
from lmcache_kvtc.inspect import describe
from lmcache_kvtc.lmcache import vllm_cpu
from lmcache_kvtc.lmcache.serde import KVTCEngine, SerdeOptions

LAYERS, HEADS, HEAD_DIM, TOKENS = 24, 2, 64, 256  # Qwen2.5-Coder-0.5B, one LMCache chunk
PREFIX_TOKENS = 2048


def run_in_vllm_env(code: str, tmp_path) -> dict:
    """Run ``code`` with the vLLM environment's Python; it prints one JSON line last."""
    done = subprocess.run([str(vllm_python()), "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=vllm_env(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the layout: derived from vLLM's own kernel, or refused ---------------------------------------------------


def test_vllm_cpu_mapping_is_derived_from_vllms_own_cache_kernel(tmp_path):
    result = run_in_vllm_env(f"""
import json, torch
from lmcache_kvtc.lmcache import vllm_cpu
from lmcache_kvtc.lmcache.layouts import FUSED, GroupLayout, to_split
m = vllm_cpu.mapping(128, {TOKENS}, {HEADS}, {HEAD_DIM}, torch.bfloat16)
obj = torch.randn(3, {TOKENS}, {2 * HEADS * HEAD_DIM}).to(torch.bfloat16)
naive = to_split(obj.unsqueeze(0), GroupLayout(FUSED, 3, {TOKENS}, {HEADS * HEAD_DIM}, torch.bfloat16), {HEAD_DIM})
print(json.dumps({{"isa": m.isa, "round_trip": torch.equal(m.from_split(m.to_split(obj)), obj),
                   "naive_agrees": torch.equal(naive, m.to_split(obj)),
                   "identity": torch.equal(m.index, torch.arange(m.index.numel()))}}))
""", tmp_path)
    assert result["round_trip"]
    assert not result["naive_agrees"], "vLLM-CPU rows are not tokens: the shape-only reading must not match"
    assert not result["identity"]
    assert result["isa"] in {"vec", "vec16", "amx", "neon", "vsx", "vxe", "rvv"}


def test_a_vllm_kernel_that_refuses_the_configuration_is_refused_not_guessed(tmp_path):
    """The AMX kernel cannot run on a host without AMX: forcing vLLM's ISA choice to it must refuse."""
    result = run_in_vllm_env(f"""
import json, torch
import vllm.v1.attention.backends.cpu_attn as cpu_attn
from lmcache_kvtc.lmcache import vllm_cpu
cpu_attn._get_attn_isa = lambda *a, **k: "no-such-isa"
try:
    vllm_cpu.derive(128, {TOKENS}, {HEADS}, {HEAD_DIM}, torch.bfloat16)
    print(json.dumps({{"refused": ""}}))
except vllm_cpu.UnsupportedLayoutError as exc:
    print(json.dumps({{"refused": str(exc)}}))
""", tmp_path)
    assert "cache kernel failed" in result["refused"]


def _fake_kernel(kind: str):
    """A stand-in for vLLM + LMCache's round trip (no vLLM in this environment) that breaks one rule."""

    def write(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        kv = torch.stack([key, value]).reshape(2, TOKENS, -1)  # [2, T, H·D]
        if kind == "duplicates":  # one token written twice, another never
            kv[:, 1] = kv[:, 0]
        if kind == "lossy":  # the digit patterns survive, real values are rounded
            kv = kv.float().round().to(key.dtype)
        if kind == "one block":  # a gather that returns only the first block
            kv = kv[:, :128]
        return kv.transpose(0, 1).reshape(kv.shape[1], -1)

    return write


@pytest.mark.parametrize("kind", ["duplicates", "lossy", "one block"])
def test_a_mapping_that_cannot_be_verified_is_refused(kind):
    with pytest.raises(UnsupportedLayoutError):
        vllm_cpu.derive(128, TOKENS, HEADS, HEAD_DIM, torch.bfloat16, write=_fake_kernel(kind))


def test_a_verified_fake_layout_round_trips_exactly():
    """The derivation itself is generic: a layout it can verify maps back bit-exactly."""
    mapping = vllm_cpu.derive(128, TOKENS, HEADS, HEAD_DIM, torch.bfloat16, write=_fake_kernel("exact"))
    kv = torch.randn(2, 3, TOKENS, HEADS * HEAD_DIM).to(torch.bfloat16)
    assert torch.equal(mapping.to_split(mapping.from_split(kv)), kv)


def test_without_vllm_in_the_server_env_a_vllm_cpu_object_is_a_failed_store(small_calibration_path):
    """The project's own venv has no vLLM: layout vllm-cpu must refuse (a miss), never fall back to a guess."""
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is importable here; this case needs an environment without it")
    except ImportError:
        pass
    obj = torch.randn(LAYERS, TOKENS, 2 * HEADS * HEAD_DIM).to(torch.bfloat16)
    engine = KVTCEngine(SerdeOptions(str(small_calibration_path), ratio=16, layout="vllm-cpu"))
    assert engine.estimate([obj.shape], [obj.dtype]) == obj.numel() * 2 // 16  # the budget needs no mapping
    with pytest.raises(UnsupportedLayoutError, match="vllm-cpu cannot be imported"):
        engine.encode([obj], None)
    auto = KVTCEngine(SerdeOptions(str(small_calibration_path), ratio=16))
    with pytest.raises(UnsupportedLayoutError, match="layout: vllm-cpu"):
        auto.encode([obj], None)


# -- end to end: vLLM-CPU ⇄ LMCache MP server ⇄ kvtc ⇄ fs / resp ---------------------------------------------


def passkey_prompt(key: str) -> str:
    """A ~2.1K-token prompt: the passkey first (in the compressed chunks), held-out KJV text, the question."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.model_dir("qwen2.5-coder-0.5b"))
    body = tokenizer.decode(tokenizer(" ".join(text("kjv")[600:700]))["input_ids"][:PREFIX_TOKENS])
    return (f"The passkey is {key}. Remember it; you will be asked for it.\n{body}\n"
            "What is the passkey? The passkey is")


def kvtc_serde(calibration, ratio: float = 16) -> dict:
    return {"type": "kvtc", "calibration": str(calibration), "ratio": ratio, "layout": "vllm-cpu", "block_size": 128}


def connector(port: int, **extra) -> dict:
    return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": port, **extra}}


CHUNK_BYTES = LAYERS * TOKENS * 2 * HEADS * HEAD_DIM * 2  # one bf16 chunk as vLLM-CPU hands it over


@pytest.fixture
def started(tmp_path):
    """Every process a test starts, stopped by PID at the end whatever happened."""
    processes: list = []
    yield processes
    for process in reversed(processes):
        process.stop()


def served_from_l2(server: MPServer, engine: VLLMDriver, prompt: str, chunks: int) -> dict:
    """One request; asserts from the server's own log that every chunk came from L2, i.e. through kvtc."""
    before = len(server.retained())
    answer = engine.generate(prompt)
    assert server.retained()[before:] == [(0, chunks)], (server.retained(), server.log)
    return answer


def test_vllm_cpu_serves_a_shared_prefix_from_kvtc_blobs_on_disk_and_in_redis(
        small_calibration_path, redis_server, tmp_path, started):
    """Stored once into both tiers; served from ``fs`` (Redis emptied), then, after vLLM was stopped and the
    server killed (SIGKILL) and both restarted, from ``resp`` alone. (A running vLLM does not re-register with
    a restarted MP server in LMCache 0.5.6, so a restart here is a restart of both.)"""
    import redis

    python = vllm_python()
    key = f"{secrets.randbelow(90000) + 10000}"
    prompt = passkey_prompt(key)
    fs = {"type": "fs", "base_path": str(tmp_path / "l2"), "serde": kvtc_serde(small_calibration_path)}
    resp = {"type": "resp", "host": redis_server.host, "port": redis_server.port,
            "serde": kvtc_serde(small_calibration_path)}
    client = redis.Redis(host=redis_server.host, port=redis_server.port)

    server = MPServer(python, tmp_path, [fs, resp], name="server")
    server.start()
    started.append(server)
    engine = VLLMDriver(python, tmp_path, models.model_dir("qwen2.5-coder-0.5b"), connector(server.port))
    started.append(engine)
    engine.wait_ready()
    first = engine.generate(prompt)  # computed, then stored: L1 → kvtc → fs and resp
    chunks = first["prompt_tokens"] // TOKENS
    assert chunks == PREFIX_TOKENS // TOKENS
    assert all(l2 == 0 for _, l2 in server.retained())
    server.wait_settled()
    files = stored_files(tmp_path / "l2")
    assert sorted(f.stat().st_size for f in files) == [CHUNK_BYTES // 16] * chunks
    in_redis = {k: client.dump(k) for k in client.scan_iter() if client.type(k) == b"string"}
    assert sorted(client.strlen(k) for k in in_redis) == [CHUNK_BYTES // 16] * chunks

    client.flushall()  # only the fs tier has the prefix now
    second = served_from_l2(server, engine, prompt, chunks)
    assert key in second["text"], (first, second)

    engine.stop()
    server.kill()  # a crashed server: whatever it had in flight must never come back as a valid object
    started.remove(engine)
    started.remove(server)
    for k, dumped in in_redis.items():  # back into Redis; the new server gets only the resp tier
        client.restore(k, 0, dumped)
    shutil.rmtree(tmp_path / "l2")
    server = MPServer(python, tmp_path, [resp], name="resp-server")
    server.start()
    started.append(server)
    engine = VLLMDriver(python, tmp_path, models.model_dir("qwen2.5-coder-0.5b"), connector(server.port),
                        name="vllm-2")
    started.append(engine)
    engine.wait_ready()
    third = served_from_l2(server, engine, prompt, chunks)
    assert key in third["text"], third


def test_vllm_autostarts_the_server_with_the_plugin_loader_and_it_outlives_vllm(
        small_calibration_path, tmp_path, started):
    python = vllm_python()
    key = f"{secrets.randbelow(90000) + 10000}"
    prompt = passkey_prompt(key)
    port, http_port = free_port(), free_port()
    adapter = {"type": "plugin", "module_path": "lmcache_kvtc.lmcache.loader", "class_name": "KVTCLoaderAdapter",
               "adapter_params": {"inner": {"type": "fs", "base_path": str(tmp_path / "l2")}},
               "serde": kvtc_serde(small_calibration_path)}
    server_args = (f"--l1-size-gb 1 --eviction-policy LRU --supported-transfer-mode auto --l2-store-policy skip_l1 "
                   f"--disable-metrics --http-port {http_port} --l2-adapter '{json.dumps(adapter)}'")
    engine = VLLMDriver(python, tmp_path, models.model_dir("qwen2.5-coder-0.5b"),
                        connector(port, **{"lmcache.mp.autostart": True,
                                           "lmcache.mp.autostart.server_args": server_args}))
    started.append(engine)
    engine.wait_ready()
    server = pids_of("lmcache.v1.multiprocess.http_server", f"--port {port}")
    assert len(server) == 1, server
    started.insert(0, Pid(server[0]))  # stopped last, whatever happens
    watcher = MPServer(python, tmp_path, adapter)  # the same server seen through its HTTP port and log
    watcher.http_port, watcher.log = http_port, engine.log  # it inherited vLLM's stderr
    first = engine.generate(prompt)
    chunks = first["prompt_tokens"] // TOKENS
    watcher.wait_settled()
    assert len(stored_files(tmp_path / "l2")) == chunks
    second = served_from_l2(watcher, engine, prompt, chunks)
    assert key in second["text"], (first, second)
    started.remove(engine)
    engine.stop(keep_children=True)
    assert pids_of("lmcache.v1.multiprocess.http_server", f"--port {port}") == server, \
        "vLLM's autostarted server is expected to outlive vLLM (the README says so)"


def passkey_stored(started: list, tmp_path, calibration, model: str, ratio: float = 16, **driver_options):
    """Start an MP server (an ``fs`` tier behind the kvtc serde) and vLLM-CPU on ``model``, send a passkey prompt
    once and wait until it is stored: ``(server, engine, key, prompt, chunks, stored files)``."""
    python = vllm_python()
    key = f"{secrets.randbelow(90000) + 10000}"
    server = MPServer(python, tmp_path, {"type": "fs", "base_path": str(tmp_path / "l2"),
                                         "serde": kvtc_serde(calibration, ratio)})
    server.start()
    started.append(server)
    engine = VLLMDriver(python, tmp_path, models.model_dir(model), connector(server.port), **driver_options)
    started.append(engine)
    engine.wait_ready()
    prompt = passkey_prompt(key)
    chunks = engine.generate(prompt)["prompt_tokens"] // TOKENS
    server.wait_settled()
    return server, engine, key, prompt, chunks, stored_files(tmp_path / "l2")


def test_vllm_cpu_with_tensor_parallel_2_serves_a_prefix_from_both_ranks_blobs(small_tp_calibration, tmp_path,
                                                                                started):
    """``--tensor-parallel-size 2``: each worker caches one of the 0.5B's two KV heads; the serde codes each
    rank's objects with that rank's calibration (found by ``kv_rank`` in the directory's index)."""
    directory, whole = small_tp_calibration
    # Both workers on core 0, so the server decodes on core 1: workers bound to every core of this 2-core machine
    # starve the server, its heartbeat misses and vLLM falls back to recomputing (measured: no L2 hit, 23 s).
    server, engine, key, prompt, chunks, files = passkey_stored(started, tmp_path, directory, "qwen2.5-coder-0.5b",
                                                                tensor_parallel_size=2, cpu_bind="0|0")
    assert sorted(f.stat().st_size for f in files) == [CHUNK_BYTES // 2 // 16] * (2 * chunks)  # a head per rank
    used = sorted(describe(f.read_bytes())["calibration_fingerprint"] for f in files)
    ranks = [Calibration.load(directory / file_name(whole.model_id, 2, r)).fingerprint.hex() for r in (0, 1)]
    assert used == sorted(ranks * chunks)
    before = len(server.retained())
    answer = engine.generate(prompt)
    assert sum(l2 for _, l2 in server.retained()[before:]) == 2 * chunks, server.retained()
    assert key in answer["text"], answer


def test_vllm_cpu_serves_gemma3_with_its_sliding_layers_from_kvtc_blobs(gemma_calibration_path, tmp_path, started):
    """Gemma 3 (5 sliding : 1 full layers, two RoPE thetas). LMCache 0.5.6's engine-driven transfer (vLLM-CPU)
    refuses vLLM's hybrid KV groups, so vLLM runs with ``--disable-hybrid-kv-cache-manager``: one group of all
    18 layers, which one calibration codes. The 270M keeps its passkey with the ladder's 8x plan (a 4x budget) and
    loses it from the 16x plan on (measured on 6 keys: 6/6 at a 4x budget, 1/6 at 8x, 0/6 at 16x)."""
    server, engine, key, prompt, chunks, files = passkey_stored(started, tmp_path, gemma_calibration_path,
                                                                "gemma-3-270m", ratio=4,
                                                                disable_hybrid_kv_cache_manager=True)
    gemma_chunk = 18 * TOKENS * 2 * 1 * 256 * 2  # 18 layers, 1 KV head of 256, K and V, bf16
    assert sorted(f.stat().st_size for f in files) == [gemma_chunk // 4] * chunks
    answer = served_from_l2(server, engine, prompt, chunks)
    assert key in answer["text"], answer
