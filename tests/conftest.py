"""Shared fixtures: real offline models and a small real calibration, built once per session.

Real-model fixtures skip (with the command that prepares them) when the model is not in
the cache, unless real parts are required (``prepared.REQUIRE``: CI), in which case they fail.
"""

from __future__ import annotations

import pytest
import torch
from prepared import missing, require_model, text

from calibration import models
from calibration.recipes import PROSE, prose_documents

SMALL_MODEL = "qwen2.5-coder-0.5b"


#: the test calibrations' source: prose as the default mix's, so benchmarks that refit prose accept them
TEST_SOURCE = f"{PROSE} (test)"

@pytest.fixture(scope="session")
def qwen05():
    require_model(SMALL_MODEL)
    return models.load(SMALL_MODEL)


@pytest.fixture(scope="session")
def gemma():
    require_model("gemma-3-270m")
    return models.load("gemma-3-270m")


@pytest.fixture(scope="session")
def tokenizer():
    """Qwen2.5's tokenizer (what the tiny models of :mod:`tiny_models` are given)."""
    from transformers import AutoTokenizer

    require_model(SMALL_MODEL)
    return AutoTokenizer.from_pretrained(models.model_dir(SMALL_MODEL), local_files_only=True)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """State of the Union addresses in one UTF-8 file, as ``kvtc calibrate --text`` takes them."""
    path = tmp_path_factory.mktemp("text") / "prose.txt"
    path.write_text("\n\n".join(text("sotu")[:40]), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_calibration_path(qwen05, tmp_path_factory):
    """A real calibration of Qwen2.5-Coder-0.5B on English prose, small enough for CI (8 × 1024 tokens)."""
    from calibration.recipes import calibrate_named

    path = tmp_path_factory.mktemp("calibration") / "qwen05-small.safetensors"
    calibrate_named(SMALL_MODEL, prose_documents(text("sotu")), tokens=8 * 1024, context=1024, heldout_contexts=2,
                    ratios=(8, 16, 32), out=path, source=TEST_SOURCE, key_weight=16.0, normalize="none")
    return path


@pytest.fixture(scope="session")
def small_tp_calibration(qwen05, tmp_path_factory):
    """``(directory, whole-model calibration)``: like :func:`small_calibration_path`, written with ``tp_sizes``
    (1, 2, 4) — one file per vLLM rank of each size (Qwen2.5-Coder-0.5B has 2 KV heads) plus ``index.json``."""
    from calibration.recipes import calibrate_named

    directory = tmp_path_factory.mktemp("tp")
    whole = calibrate_named(SMALL_MODEL, prose_documents(text("sotu")), tokens=8 * 1024, context=1024,
                            heldout_contexts=2, ratios=(8, 16, 32), out=directory, source=TEST_SOURCE,
                            key_weight=16.0, normalize="none", tp_sizes=(1, 2, 4))
    return directory, whole


@pytest.fixture(scope="session")
def gemma_calibration_path(gemma, tmp_path_factory):
    """A small real calibration of Gemma 3 270M (sliding and full layers, two RoPE thetas) on English prose, each
    layer scaled to unit energy (its first layers carry 10x the value energy of the rest)."""
    from calibration.recipes import calibrate_named

    path = tmp_path_factory.mktemp("calibration") / "gemma-small.safetensors"
    calibrate_named("gemma-3-270m", prose_documents(text("sotu")), tokens=8 * 1024, context=1024, heldout_contexts=2,
                    ratios=(8, 16, 32), out=path, source=TEST_SOURCE, key_weight=16.0, normalize="layer")
    return path


@pytest.fixture(scope="session")
def small_calibration(small_calibration_path):
    from lmcache_kvtc import Calibration

    return Calibration.load(small_calibration_path)


@pytest.fixture(scope="session")
def eval_kv(qwen05):
    """A real bf16 KV cache ``[2, L, 640, H*D]`` of held-out text (Python docs) and its token ids."""
    from calibration import texts
    from lmcache_kvtc.calibrate.capture import prefill

    model, tokenizer = qwen05
    ids = texts.token_contexts(tokenizer, texts.python_docs(), 1, 640, seed=3)[0]
    kv, _ = prefill(model, ids, logits_to_keep=1)
    return kv, ids


@pytest.fixture(scope="session")
def synthetic():
    """``(calibration, make)``: a model-free calibration and a maker of KV like it (:mod:`synthetic`)."""
    from synthetic import synthetic_calibration

    return synthetic_calibration()


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


# -- LMCache integration: a real redis-server on loopback, started and stopped by the tests --------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway ``redis-server`` on 127.0.0.1 that tests can stop, kill and restart; with ``persist`` it
    keeps every write in an append-only file (fsync'd per write) in ``workdir``, so a restart has its old data."""

    def __init__(self, workdir, extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.host = "127.0.0.1"
        self.workdir = workdir
        self.extra_args = tuple(extra_args)  # more redis-server options, on every (re)start
        self.process = None

    def start(self, persist: bool = False) -> None:
        import subprocess
        import time

        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--bind", self.host, "--port", str(self.port), "--save", "",
             "--appendonly", "yes" if persist else "no", "--appendfsync", "always", "--dir", str(self.workdir),
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host=self.host, port=self.port)
        for _ in range(200):
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save, connections cut mid-command."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def redis_server(tmp_path):
    import shutil

    if shutil.which("redis-server") is None:
        missing("redis-server is not installed (apt-get install -y redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


class RedisCluster:
    """A throwaway Redis Cluster of ``masters`` masters (no replicas) on 127.0.0.1, every node a
    :class:`RedisServer` in its own directory with its own cluster config file, so a killed master restarted on
    its port rejoins with its slots (and none of its data: nothing is persisted). ``node_timeout_ms`` is the
    cluster's failure detection time (short, so a test sees ``cluster_state:fail`` quickly)."""

    def __init__(self, workdir, masters: int = 3, node_timeout_ms: int = 1000):
        self.nodes = []
        for i in range(masters):
            directory = workdir / f"node{i}"
            directory.mkdir()
            # the bus port is given, not port + 10000, which can be past 65535 for a free high port
            args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms), "--cluster-port", str(free_port()))
            self.nodes.append(RedisServer(directory, extra_args=args))

    @property
    def startup_nodes(self) -> str:
        """The ``valkey`` adapter's ``startup_nodes``: every master, ``host:port,...``."""
        return ",".join(f"{n.host}:{n.port}" for n in self.nodes)

    def start(self) -> None:
        import subprocess

        for node in self.nodes:
            node.start()
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"{n.host}:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout}{create.stderr}")
        self.wait_state("ok")

    def client(self, i: int):
        import redis

        node = self.nodes[i]
        return redis.Redis(host=node.host, port=node.port, socket_timeout=2, socket_connect_timeout=2)

    def state(self, i: int) -> str | None:
        """``cluster_state`` as node ``i`` sees it (None: not answering)."""
        import redis

        try:
            return self.client(i).cluster("info")["cluster_state"]
        except (redis.RedisError, OSError):
            return None

    def wait_state(self, state: str, timeout: float = 30.0) -> None:
        """Until every running node reports ``cluster_state:<state>`` (and knows every master, for ``ok``)."""
        import time

        running = [i for i, n in enumerate(self.nodes) if n.process is not None]
        deadline = time.monotonic() + timeout
        while True:
            if all(self.state(i) == state for i in running) and (state != "ok" or all(
                    len(self.client(i).cluster("slots")) == len(self.nodes) for i in running)):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not reach cluster_state:{state} in {timeout}s: "
                                   f"{[self.state(i) for i in running]}")
            time.sleep(0.1)

    def master_of(self, key: str | bytes) -> int:
        """The index of the node that serves ``key``'s slot."""
        from redis.cluster import key_slot

        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for start, end, (_, port, *_), *_ in self.client(0).cluster("slots"):
            if start <= slot <= end:
                return next(i for i, n in enumerate(self.nodes) if n.port == port)
        raise LookupError(f"slot {slot} is not served")

    def dbsizes(self) -> list[int]:
        return [self.client(i).dbsize() for i in range(len(self.nodes))]

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def restart(self, i: int) -> None:
        """Node ``i`` again on its port, with its cluster config file: it rejoins with its slots, empty."""
        self.nodes[i].start()
        self.wait_state("ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def redis_cluster(tmp_path):
    """A started 3-master :class:`RedisCluster`; needs redis-server and redis-cli (Redis >= 7: ``cluster-port``)."""
    import shutil

    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (apt-get install -y redis-server)")
    cluster = RedisCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
