"""What ``pip install`` gets: the library alone (no top-level ``calibration``/``benchmarks``), its codec working
without LMCache or transformers, and checkout-only commands that say so instead of failing obscurely."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"


def test_the_wheel_holds_only_the_lmcache_kvtc_package_with_license_and_extras(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("lmcache_kvtc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"lmcache_kvtc", next(n for n in names if ".dist-info/" in n)
                                                .split("/")[0]}
    assert "lmcache_kvtc/calibrate/driver.py" in names and "lmcache_kvtc/lmcache/serde.py" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata or "License: Apache-2.0" in metadata
    assert any(n.endswith("/LICENSE") for n in names)
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if "extra ==" not in r and r.split()[1].startswith(("lmcache", "redis"))]
    assert any(r.startswith("Requires-Dist: lmcache==0.5.6") and 'extra == "lmcache"' in r for r in requires)
    assert any(r.startswith("Requires-Dist: valkey-glide-sync==2.6.0") and 'extra == "valkey"' in r for r in requires)


def test_the_codec_imports_and_decodes_without_lmcache_or_transformers_installed():
    blocked = ["lmcache", "transformers", "redis", "cryptography", "tqdm", "matplotlib", "calibration", "benchmarks"]
    script = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r}))\n"
              "from pathlib import Path\n"
              "from lmcache_kvtc import Calibration, KVTCCodec\n"
              "from lmcache_kvtc.inspect import describe\n"
              f"golden = Path({str(GOLDEN)!r})\n"
              "blob = (golden / 'codec.kvtc').read_bytes()\n"
              "kv = KVTCCodec(Calibration.load(golden / 'synthetic.safetensors')).decode(blob)\n"
              "print(tuple(kv.shape), describe(blob)['plan'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=GOLDEN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("(2, 2, 300, 64)")


def test_the_cli_works_from_the_package_alone_and_sends_registry_names_to_the_checkout(tmp_path):
    shutil.copytree(REPO / "lmcache_kvtc", tmp_path / "lmcache_kvtc")  # as installed: no calibration/ beside it
    blocked = ["calibration", "benchmarks", "transformers", "lmcache"]
    prelude = f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); from lmcache_kvtc.cli import main; "

    def kvtc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", prelude + f"sys.exit(main({list(args)!r}))"],
                              capture_output=True, text=True, cwd=tmp_path)

    assert "{calibrate,inspect}" in kvtc("--help").stdout
    done = kvtc("calibrate", "--model", "qwen2.5-coder-0.5b", "--text", "t.txt", "--out", "x.safetensors")
    assert done.returncode != 0 and "is not a model directory" in done.stderr
    assert "python -m calibration.recipes" in done.stderr
    golden = kvtc("inspect", str(GOLDEN / "codec.kvtc"), "--calibration", str(GOLDEN / "synthetic.safetensors"))
    assert golden.returncode == 0 and '"decodes_with"' in golden.stdout, golden.stderr
