"""Every file in examples/ is parsed by LMCache 0.5.6's own parsers (vLLM itself is not installed here).

* ``lmcache server`` command lines: LMCache's ``ServerCommand`` argument parser + ``parse_args_to_config``;
* vLLM ``LMCacheMPConnector`` JSON: LMCache's ``MPServerAutostartConfig.from_extra_config`` (what the connector
  calls to auto-start the server) and then the server parser on the resulting command;
* vLLM ``LMCacheConnectorV1`` JSON: LMCache's ``validate_and_set_config_value`` (what its vLLM adapter applies
  to ``lmcache.*`` extra-config keys) on the classic YAML loaded by ``LMCacheEngineConfig.from_file``.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
from lmcache.cli.commands.server import ServerCommand
from lmcache.integration.vllm.mp_server_launcher import MPServerAutostartConfig
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.config_base import validate_and_set_config_value
from lmcache.v1.distributed.config import parse_args_to_config

from lmcache_kvtc.lmcache.classic import options_from_extra_config
from lmcache_kvtc.lmcache.loader import inner_config
from lmcache_kvtc.lmcache.serde import SerdeOptions

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def server_config(argv: list[str]):
    parser = argparse.ArgumentParser()
    ServerCommand().add_arguments(parser)
    return parse_args_to_config(parser.parse_args(argv))


def script_argv(path: Path) -> list[str]:
    """Arguments after the command in a shell example (comments dropped, continuations joined)."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    words = shlex.split(" ".join(line.rstrip("\\") for line in lines))
    start = words.index("server") + 1 if "server" in words else 1
    return words[start:]


def check_kvtc_adapters(config) -> list:
    adapters = config.l2_adapter_config.adapters
    assert adapters
    for adapter in adapters:
        assert adapter.serde_config is not None and adapter.serde_config.type == "kvtc"
        SerdeOptions.from_kwargs(adapter.serde_config.kwargs)  # our own validation accepts the kwargs
        if getattr(adapter, "module_path", None):
            assert adapter.module_path == "lmcache_kvtc.lmcache.loader"
            assert adapter.class_name == "KVTCLoaderAdapter"
            inner_config(adapter.adapter_params)  # LMCache's registry parses the inner adapter spec
    return adapters


@pytest.mark.parametrize("name", ["lmcache_server_fs.sh", "lmcache_server_resp.sh", "lmcache_server_vllm_cpu.sh",
                                  "lmcache_server_valkey_cluster.sh"])
def test_server_command_lines_parse(name):
    config = server_config(script_argv(EXAMPLES / name))
    (adapter,) = check_kvtc_adapters(config)
    assert config.l1_manager_configs or config.l1_manager_config


def test_valkey_example_is_a_cluster_behind_the_loader():
    (adapter,) = check_kvtc_adapters(server_config(script_argv(EXAMPLES / "lmcache_server_valkey_cluster.sh")))
    inner = inner_config(adapter.adapter_params)  # LMCache's ValkeyL2AdapterConfig (no connection made)
    assert type(inner).__name__ == "ValkeyL2AdapterConfig" and inner.cluster_mode and len(inner.startup_nodes) == 3


def test_vllm_mp_connector_without_autostart():
    spec = json.loads((EXAMPLES / "vllm_mp_connector.json").read_text())
    assert spec["kv_connector"] == "LMCacheMPConnector"
    extra = spec["kv_connector_extra_config"]
    autostart = MPServerAutostartConfig.from_extra_config(extra, extra["lmcache.mp.host"], extra["lmcache.mp.port"])
    assert not autostart.enabled


def test_vllm_mp_connector_with_autostart_server_args():
    spec = json.loads((EXAMPLES / "vllm_mp_autostart.json").read_text())
    extra = spec["kv_connector_extra_config"]
    autostart = MPServerAutostartConfig.from_extra_config(extra, extra["lmcache.mp.host"], extra["lmcache.mp.port"])
    assert autostart.enabled
    command = autostart.command()
    assert command[1:3] == ["-m", "lmcache.v1.multiprocess.http_server"]
    (adapter,) = check_kvtc_adapters(server_config(command[3:]))
    assert adapter.module_path == "lmcache_kvtc.lmcache.loader"  # autostart cannot use the launcher


def test_classic_yaml_and_vllm_connector_v1():
    config = LMCacheEngineConfig.from_file(str(EXAMPLES / "lmcache_classic.yaml"))
    assert config.storage_plugins == ["kvtc"]
    assert config.extra_config["storage_plugin.kvtc.module_path"] == "lmcache_kvtc.lmcache.classic"
    options, limit, _ = options_from_extra_config(config.extra_config)
    assert options.ratio == 12 and limit == 20 * 2**30
    spec = json.loads((EXAMPLES / "vllm_connector_v1.json").read_text())
    assert spec["kv_connector"] == "LMCacheConnectorV1"
    for key, value in spec["kv_connector_extra_config"].items():
        assert key.startswith("lmcache.")
        assert validate_and_set_config_value(config, key.removeprefix("lmcache."), value)


def test_every_example_is_covered():
    covered = {"lmcache_server_fs.sh", "lmcache_server_resp.sh", "lmcache_server_vllm_cpu.sh",
               "lmcache_server_valkey_cluster.sh",
               "vllm_mp_connector.json", "vllm_mp_autostart.json",
               "lmcache_classic.yaml", "vllm_connector_v1.json", "README.md"}
    mine = {p.name for p in EXAMPLES.iterdir() if p.suffix in {".sh", ".json", ".yaml"}}
    assert mine <= covered, mine - covered
