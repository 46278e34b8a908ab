"""Getting ``kvtc`` loaded by LMCache itself: the ``plugin`` loader adapter and the launcher command.

Both run in subprocesses that never import ``lmcache_kvtc`` themselves: LMCache must do it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from lmcache_helpers import standalone
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]

# Plain LMCache code (the 0.5.6 MP API); the only kvtc-specific thing is the adapter JSON.
SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import torch
    from safetensors.torch import load_file, save_file
    from lmcache.v1.distributed.api import GroupedObjectKeys, MemoryLayoutDesc, ObjectKey, PrefetchTaskSpec
    from lmcache.v1.distributed.config import get_arg_parser, parse_args_to_config
    from lmcache.v1.distributed.serde import get_registered_serde_types
    from lmcache.v1.distributed.storage_manager import StorageManager

    spec, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
    before = sorted(get_registered_serde_types())
    assert not any(m.startswith("lmcache_kvtc") for m in sys.modules), "test script imported lmcache_kvtc"
    args = ["--l1-size-gb", "0.25", "--eviction-policy", "LRU", "--no-l1-use-lazy", "--l2-adapter", spec]
    sm = StorageManager(parse_args_to_config(get_arg_parser().parse_args(args)))
    after = sorted(get_registered_serde_types())
    chunks = load_file(src)
    chunks = [chunks[f"c{i}"] for i in range(len(chunks))]
    layout = MemoryLayoutDesc([chunks[0].shape], [chunks[0].dtype])
    keys = [ObjectKey(os.urandom(32), "qwen2.5-coder-0.5b", 0) for _ in chunks]
    objs = sm.reserve_write(keys, layout)
    for k, c in zip(keys, chunks):
        objs[k].tensor.copy_(c)
    sm.finish_write(keys)
    deadline = time.time() + 120
    base = sys.argv[4]
    while time.time() < deadline and sum(len(f) for _, _, f in os.walk(base)) < len(keys):
        time.sleep(0.1)
    time.sleep(1.0)
    sm.clear(force=True)
    h = sm.submit_prefetch_task(PrefetchTaskSpec([GroupedObjectKeys(keys, 0, layout)]))
    sm.wait_prefetch_status(h, 120)
    r = sm.query_prefetch_status(h)
    with sm.read_prefetched_results(keys) as objs:
        save_file({f"c{i}": o.tensor.clone() for i, o in enumerate(objs)}, out)
    sm.finish_read_prefetched(keys)
    sm.close()
    print(json.dumps({"before": before, "after": after, "l2_hits": r.l2_hit_count}))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}


def test_plugin_loader_registers_kvtc_inside_lmcache(eval_kv, small_calibration_path, small_calibration, tmp_path):
    kv, _ = eval_kv
    chunks = [kv[:, :, i : i + 256].contiguous() for i in (0, 256)]
    save_file({f"c{i}": c for i, c in enumerate(chunks)}, tmp_path / "in.safetensors")
    base = tmp_path / "l2"
    spec = json.dumps({
        "type": "plugin", "module_path": "lmcache_kvtc.lmcache.loader", "class_name": "KVTCLoaderAdapter",
        "adapter_params": {"inner": {"type": "fs", "base_path": str(base)}},
        "serde": {"type": "kvtc", "calibration": str(small_calibration_path), "ratio": 16},
    })
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script), spec, str(tmp_path / "in.safetensors"),
                             str(tmp_path / "out.safetensors"), str(base)],
                            capture_output=True, text=True, timeout=300, env=env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "kvtc" not in report["before"] and "kvtc" in report["after"]
    assert report["l2_hits"] == 2
    restored = load_file(tmp_path / "out.safetensors")
    for i, start in enumerate((0, 256)):
        assert torch.equal(restored[f"c{i}"], standalone(small_calibration, chunks[i], start))


def _server_args(l2: Path, calibration: Path) -> list[str]:
    adapter = {"type": "fs", "base_path": str(l2), "serde": {"type": "kvtc", "calibration": str(calibration)}}
    return ["--host", "127.0.0.1", "--port", str(free_port()), "--http-port", str(free_port()),
            "--l1-size-gb", "0.1", "--eviction-policy", "LRU", "--no-l1-use-lazy", "--shm-name", "",
            "--l2-adapter", json.dumps(adapter)]


def _run_until(command: list[str], marker: str, cwd: Path, timeout: float = 180) -> tuple[bool, str]:
    """Start ``command``; True once ``marker`` appears in its output, False if it exits first."""
    log = cwd / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env(), cwd=cwd)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                text = log.read_text(errors="replace")
                if marker in text:
                    return True, text
                if proc.poll() is not None:
                    return False, log.read_text(errors="replace")
                time.sleep(0.5)
            return False, log.read_text(errors="replace")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_launcher_runs_lmcache_server_with_kvtc_and_plain_lmcache_cannot(small_calibration_path, tmp_path):
    args = _server_args(tmp_path / "l2", small_calibration_path)
    ok, text = _run_until([sys.executable, "-m", "lmcache_kvtc.lmcache.launcher", "server", *args],
                          "LMCache cache server is running", tmp_path)
    assert ok, text[-4000:]
    assert "kvtc serde:" in text  # our factory ran inside the server
    ok, text = _run_until([sys.executable, "-m", "lmcache.cli.main", "server", *args],
                          "LMCache cache server is running", tmp_path)
    assert not ok and "Unknown serde type 'kvtc'" in text


def test_loader_adapter_forwards_the_calls_lmcache_057_adds(tmp_path):
    """LMCache 0.5.7 makes ``get_memory_tags`` abstract and adds ``submit_touch``: the wrapper must delegate both.

    0.5.6 is pinned and its adapters have neither, so the inner adapter is a real 0.5.6 ``fs`` adapter given the
    two 0.5.7 methods (the stand-in); a touch on a plain 0.5.6 adapter is a no-op, not an error.
    """
    from lmcache.v1.distributed.l2_adapters import create_l2_adapter

    from lmcache_kvtc.lmcache.loader import KVTCLoaderAdapter, inner_config
    from lmcache_kvtc.lmcache.reconnect import ReconnectingAdapter

    params = {"inner": {"type": "fs", "base_path": str(tmp_path / "plain")}}
    plain = KVTCLoaderAdapter(params)
    try:
        plain.submit_touch([])
    finally:
        plain.close()
    inner = create_l2_adapter(inner_config({"inner": {"type": "fs", "base_path": str(tmp_path / "057")}}), None)
    touched: list = []
    inner.get_memory_tags = lambda: "remote"
    inner.submit_touch = touched.append
    adapter = ReconnectingAdapter(lambda: inner, retry_seconds=0)
    try:
        keys = [object()]
        adapter.submit_touch(keys)
        assert touched == [keys] and adapter.get_memory_tags() == "remote"
    finally:
        adapter.close()
