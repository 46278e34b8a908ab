"""Real processes for the vLLM-CPU end-to-end test and the TTFT benchmark: an LMCache MP server and a vLLM
engine (:mod:`benchmarks.vllm_driver`), both from the vLLM environment, each started and stopped by PID."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RETAINED = re.compile(r"retained keys \((\d+) L1, (\d+) L2\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_env(workdir: Path) -> dict[str, str]:
    """vLLM-CPU settings for a 2-core CI machine: small KV space, private caches, offline."""
    (workdir / "rpc").mkdir(parents=True, exist_ok=True)
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CACHE_ROOT": str(workdir / "vllm-cache"),
            "VLLM_RPC_BASE_PATH": str(workdir / "rpc"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "LMCACHE_DISABLE_BANNER": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def stop_pid(pid: int, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL; returns once ``pid`` is gone (or was never there)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                finished, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child: poll for its disappearance
                finished = 0 if Path(f"/proc/{pid}").exists() else pid
            if finished:
                return
            time.sleep(0.1)


def pids_of(*fragments: str) -> list[int]:
    """PIDs whose command line contains every fragment (to find a server vLLM started by itself)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(f in cmdline for f in fragments):
                found.append(int(proc.name))
    return found


class MPServer:
    """``kvtc-lmcache-server`` (LMCache's MP server with the kvtc serde registered) on free loopback ports."""

    def __init__(self, python: Path, workdir: Path, l2_adapters: dict | list[dict], name: str = "server",
                 port: int = 0):
        self.python, self.workdir, self.name = python, workdir, name
        self.l2_adapters = l2_adapters if isinstance(l2_adapters, list) else [l2_adapters]
        self.port, self.http_port = port or free_port(), free_port()
        self.log = workdir / f"{name}.log"
        self.starts = 0
        self.process: subprocess.Popen | None = None

    def args(self) -> list[str]:
        return ["--l1-size-gb", "1", "--eviction-policy", "LRU", "--supported-transfer-mode", "auto",
                "--l2-store-policy", "skip_l1", "--disable-metrics", "--http-port", str(self.http_port),
                *[arg for adapter in self.l2_adapters for arg in ("--l2-adapter", json.dumps(adapter))]]

    def start(self, timeout: float = 180) -> None:
        """Start (again): each process logs to its own file, so counters are this process's own."""
        launcher = self.python.parent / "kvtc-lmcache-server"
        self.starts += 1
        self.log = self.workdir / f"{self.name}-{self.starts}.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([str(launcher), "--host", "127.0.0.1", "--port", str(self.port),
                                             *self.args()], stdout=log, stderr=subprocess.STDOUT,
                                            env=vllm_env(self.workdir), cwd=REPO)
        wait_for_log(self.log, "LMCache cache server is running", timeout, self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_pid(self.process.pid)
            self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, stores in flight are cut off."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None

    def retained(self) -> list[tuple[int, int]]:
        """``(from L1, from L2)`` of every prefetch the server logged, oldest first."""
        return [(int(a), int(b)) for a, b in RETAINED.findall(self.log.read_text(errors="replace"))]

    def wait_registered(self, timeout: float = 120) -> None:
        """Until a vLLM engine registered its KV caches with this server process (after a restart vLLM's
        connector re-registers on its next heartbeat, ~10 s)."""
        wait_for_log(self.log, "Registered non-GPU context", timeout, self.process)

    def status(self) -> dict:
        """The server's own ``/status`` document."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/status", timeout=5) as response:
            return json.load(response)

    def wait_settled(self, timeout: float = 120) -> None:
        """Until every store reached L2 and L1 is empty (``skip_l1``): the next hit can only come from L2."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            manager = self.status()["storage_manager"]
            busy = sum(c["pending_keys_count"] + c["in_flight_task_count"]
                       for c in manager["store_controllers"].values())
            held = sum(m["total_object_count"] for m in manager["l1_managers"].values())
            if busy == 0 and held == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"LMCache server still storing after {timeout:.0f} s; see {self.log}")


def wait_for_log(log: Path, text: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited ({process.returncode}) before {text!r}; see {log}")
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} not in {log} after {timeout:.0f} s")


class VLLMDriver:
    """One ``vllm.LLM`` in its own process (``benchmarks.vllm_driver``), fed one request at a time."""

    def __init__(self, python: Path, workdir: Path, model: Path, kv_transfer_config: dict, name: str = "vllm",
                 max_model_len: int = 4096, tensor_parallel_size: int = 1, cpu_bind: str | None = None,
                 disable_hybrid_kv_cache_manager: bool = False):
        self.log = workdir / f"{name}.log"
        config = {"model": str(model), "kv_transfer_config": kv_transfer_config, "max_model_len": max_model_len,
                  "tensor_parallel_size": tensor_parallel_size,
                  "disable_hybrid_kv_cache_manager": disable_hybrid_kv_cache_manager}
        env = vllm_env(workdir)
        if cpu_bind:  # vLLM-CPU's cores per worker, "0|1" (it starts TP workers only with explicit cores)
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([str(python), "-m", "benchmarks.vllm_driver", json.dumps(config)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            env=env, cwd=REPO, text=True, start_new_session=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith("RESULT "):
                self._lines.put(line[len("RESULT "):])
        self._lines.put(None)

    def _result(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"vLLM gave no answer in {timeout:.0f} s; see {self.log}") from None
        if line is None:
            raise RuntimeError(f"vLLM exited ({self.process.wait()}); see {self.log}")
        return json.loads(line)

    def wait_ready(self, timeout: float = 600) -> None:
        assert self._result(timeout).get("ready")

    def generate(self, prompt: str, max_tokens: int = 8, timeout: float = 300) -> dict:
        self.process.stdin.write(json.dumps({"prompt": prompt, "max_tokens": max_tokens}) + "\n")
        self.process.stdin.flush()
        return self._result(timeout)

    def stop(self, keep_children: bool = False) -> None:
        """Close stdin (the driver exits), then stop what is left of vLLM's process group, unless told to leave
        it (to see what outlives vLLM)."""
        try:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
            pass
        if not keep_children:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            stop_pid(self.process.pid)


class Pid:
    """A process this test did not start itself (e.g. a server vLLM spawned), stopped by PID."""

    def __init__(self, pid: int):
        self.pid = pid

    def stop(self) -> None:
        stop_pid(self.pid)
