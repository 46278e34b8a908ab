"""Time to first token in a real vLLM-CPU: recompute vs an L2 hit through kvtc, LMCache's fp8, or no serde.

For every (tier, serde) a new LMCache MP server and a new vLLM engine (``.venv-vllm``, Qwen2.5-Coder-0.5B,
eager, prefix caching off; LMCache 0.5.6's connector does not re-register with a restarted server). Per
prefix length and repeat, a fresh prompt (random passkey + held-out Python docs) is sent twice with
``max_tokens=1``: the first is a miss (recompute, which also stores); once every chunk is in L2 and L1
is empty (``skip_l1``), the second is an L2 hit. The server's own log must show every chunk coming from
L2, and the times it logs for the prefetch (L2 read + deserialize) and for the copy into vLLM say where
the hit's time goes.

    python -m benchmarks.ttft [--prefixes 2048,8192] [--repeats 3] [--ratios 16,32] [--tiers fs,resp]
                              [--only fs:kvtc16x,resp:none] [--calibration FILE]
                              [--out benchmarks/results/ttft-qwen2.5-coder-0.5b]
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchmarks.vllm_processes import REPO, MPServer, VLLMDriver, free_port
from calibration import models, texts
from calibration.recipes import default_calibration

MODEL = "qwen2.5-coder-0.5b"
CHUNK = 256
PREFETCH = re.compile(r"retained keys \((\d+) L1, (\d+) L2\) in ([\d.]+) ms")
RETRIEVED = re.compile(r"Retrieved (\d+) tokens in ([\d.]+) seconds")


def serdes(calibration: Path, ratios: list[float]) -> dict[str, dict | None]:
    """The serdes compared: kvtc at each ratio, LMCache's own fp8 cast, and none (raw bf16 objects)."""
    out: dict[str, dict | None] = {
        f"kvtc {r:g}x": {"type": "kvtc", "calibration": str(calibration), "ratio": r, "layout": "vllm-cpu",
                         "max_workers": 2}
        for r in ratios
    }
    out["fp8"] = {"type": "fp8"}
    out["none"] = None
    return out


def adapter(tier: str, workdir: Path, redis_port: int, serde: dict | None) -> dict:
    spec = ({"type": "fs", "base_path": str(workdir / "l2")} if tier == "fs"
            else {"type": "resp", "host": "127.0.0.1", "port": redis_port})
    return {**spec, "serde": serde} if serde else spec


def prompt(body: str) -> str:
    """A fresh prompt on the same body: a new passkey first changes every chunk's hash, so it is a miss."""
    return f"The passkey is {secrets.randbelow(90000) + 10000}.\n{body}\nThe passkey is"


def bodies(prefixes: list[int]) -> dict[int, str]:
    """About ``prefix`` tokens of held-out text (the Python docs; calibrations never see them) per prefix."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.model_dir(MODEL))
    ids = tokenizer(" ".join(texts.python_docs()[:400]))["input_ids"]
    return {p: tokenizer.decode(ids[:p]) for p in prefixes}


def stored_bytes(tier: str, workdir: Path, redis_port: int) -> int:
    if tier == "fs":
        return sum(p.stat().st_size for p in (workdir / "l2").rglob("*") if p.is_file())
    import redis

    client = redis.Redis(port=redis_port)
    return sum(client.strlen(k) for k in client.scan_iter() if client.type(k) == b"string")


def clear(tier: str, workdir: Path, redis_port: int) -> None:
    if tier == "fs":
        shutil.rmtree(workdir / "l2", ignore_errors=True)
    else:
        import redis

        redis.Redis(port=redis_port).flushall()


def run(args) -> dict:
    python = Path(args.vllm_venv) / "bin" / "python"
    calibration = Path(args.calibration) if args.calibration else default_calibration(MODEL)
    prefixes = [int(p) for p in args.prefixes.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="kvtc-ttft-"))
    redis_port = free_port()
    redis_server = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                                     "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    port = free_port()  # the same port for every server: a stopped server's port is free again
    texts_by_prefix = bodies(prefixes)
    rows = []
    engine = server = None
    try:
        known = serdes(calibration, [float(r) for r in args.ratios.split(",")])
        only = set(args.only.split(",")) if args.only else None
        for tier in args.tiers.split(","):
            for name, serde in known.items():
                if only is not None and f"{tier}:{name.replace(' ', '')}" not in only:
                    continue
                clear(tier, workdir, redis_port)
                server = MPServer(python, workdir, adapter(tier, workdir, redis_port, serde),
                                  name=f"{tier}-{name.replace(' ', '')}", port=port)
                server.start()
                # LMCache 0.5.6: a running vLLM does not re-register with a restarted server, so a new engine too
                engine = VLLMDriver(python, workdir, models.model_dir(MODEL),
                                    {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                                     "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1",
                                                                   "lmcache.mp.port": port}},
                                    name=f"vllm-{tier}-{name.replace(' ', '')}", max_model_len=max(prefixes) + 512)
                engine.wait_ready()
                server.wait_registered()
                for prefix in prefixes:
                    for _ in range(args.repeats):
                        row = measure(engine, server, prompt(texts_by_prefix[prefix]), tier, name, prefix, workdir,
                                      redis_port)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                engine.stop()
                engine = None
                server.stop()
                server = None
    finally:
        if server is not None:
            server.stop()
        if engine is not None:
            engine.stop()
        redis_server.terminate()
        redis_server.wait(timeout=10)
    return {"model": MODEL, "calibration": str(calibration), "prefixes": prefixes, "repeats": args.repeats,
            "machine": machine(), "rows": rows}


def measure(engine, server, prompt, tier, name, prefix, workdir, redis_port) -> dict:
    before_bytes = stored_bytes(tier, workdir, redis_port)
    miss = engine.generate(prompt, max_tokens=1)
    server.wait_settled()
    chunks = miss["prompt_tokens"] // CHUNK
    stored = stored_bytes(tier, workdir, redis_port) - before_bytes
    log_before = server.log.read_text(errors="replace")
    hit = engine.generate(prompt, max_tokens=1)
    new_log = server.log.read_text(errors="replace")[len(log_before):]
    prefetch = PREFETCH.findall(new_log)
    retrieved = RETRIEVED.findall(new_log)
    from_l2 = sum(int(b) for _, b, _ in prefetch)
    return {"tier": tier, "serde": name, "prefix": prefix, "prompt_tokens": miss["prompt_tokens"],
            "recompute_s": miss["seconds"], "hit_s": hit["seconds"], "chunks": chunks, "chunks_from_l2": from_l2,
            "prefetch_s": sum(float(ms) for *_, ms in prefetch) / 1000,
            "retrieve_s": sum(float(s) for _, s in retrieved),
            "stored_bytes_per_token": stored / max(1, chunks * CHUNK)}


def machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}"


def summarize(result: dict) -> str:
    rows = result["rows"]
    bf16_per_token = 24 * 2 * 128 * 2  # Qwen2.5-Coder-0.5B: layers × (K, V) × kv_heads·head_dim × 2 bytes
    lines = [f"# TTFT in vLLM-CPU {result['model']} (LMCache 0.5.6 MP, engine-driven; {result['machine']})", "",
             f"Median (min–max) over {result['repeats']} repeats, seconds, `max_tokens=1`. Recompute = a miss "
             "(vLLM prefills, LMCache stores). Hit = every full 256-token chunk loaded from the L2 tier "
             "(server log), the rest prefilled. Prefetch = the server's L2 read + deserialize; "
             "retrieve = its copy into vLLM's cache.", "",
             "| tier | serde | prefix | recompute | L2 hit | speed-up | prefetch | retrieve | stored B/token "
             "(ratio vs bf16) | chunks from L2 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["tier"], row["serde"], row["prefix"]), []).append(row)
    def stat(group: list[dict], key: str) -> str:
        values = [r[key] for r in group]
        return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    for (tier, serde, prefix), group in groups.items():
        speedup = statistics.median(r["recompute_s"] / r["hit_s"] for r in group)
        per_token = statistics.median(r["stored_bytes_per_token"] for r in group)
        from_l2 = f"{sum(r['chunks_from_l2'] for r in group)}/{sum(r['chunks'] for r in group)}"
        lines.append(f"| {tier} | {serde} | {prefix} | {stat(group, 'recompute_s')} | {stat(group, 'hit_s')} | "
                     f"{speedup:.1f}× | "
                     f"{stat(group, 'prefetch_s')} | {stat(group, 'retrieve_s')} | {per_token:,.0f} "
                     f"({bf16_per_token / per_token:.1f}×) | {from_l2} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", default="2048,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ratios", default="16,32")
    parser.add_argument("--tiers", default="fs,resp")
    parser.add_argument("--only", help="run only these tier:serde pairs, e.g. fs:kvtc16x,fs:fp8,resp:none")
    parser.add_argument("--calibration")
    parser.add_argument("--vllm-venv", default=str(REPO / ".venv-vllm"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / f"ttft-{MODEL}"))
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))  # not with_suffix: "0.5b" has a dot
    Path(args.out + ".md").write_text(summarize(result))
    print(summarize(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
