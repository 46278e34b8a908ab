"""The ``kvtc`` serde's settings: the adapter JSON's ``"serde"`` dict, validated.

    calibration   file or directory of calibrations (required; see .selection)
    ratio         every stored object takes at most 1/ratio of its bf16 bytes (default 12); each chunk is
                  coded with the finest plan of the calibration's ladder that fits (rate control)
    device        torch device for coding (default "cpu")
    fixed_size    pad blobs to exactly that budget (default true, as 0.5.6's fs/resp need; false for
                  adapters that keep sizes: blobs then take their true size, still within the budget)
    max_workers   serde thread pool size (default 1)
    sinks         tokens kept exact at sequence position 0 (default 4)
    max_position  positions searched for a chunk's base (default 131072)
    chunk_size    base positions are multiples of this (default: the object's token count)
    layout        "auto" (default: the 4-D layouts of GPU vLLM and the classic path) or "vllm-cpu": 3-D
                  objects are vLLM-CPU's paged blocks, mapped through vLLM's own kernels, which must be
                  importable in the server's environment (see .vllm_cpu)
    block_size    vLLM's block size, with layout "vllm-cpu" (default 128, vLLM-CPU's own default)
    master_key_path  seal every blob with AES-GCM, one key per cache_salt derived from this file's bytes
                  (at least 32) by LMCache's HkdfKeyProvider (default "": not sealed; see .sealing)
    aes_bits      128 or 256 (default 256), with master_key_path
    kv_cache_dtype  vLLM's --kv-cache-dtype: "auto" (default: bf16/fp16 objects; uint8 ones are refused) or
                  "fp8" / "fp8_e4m3" / "fp8_e5m2": uint8 objects are that fp8 cache (see .fp8); ``ratio``
                  still counts bf16 bytes, so against the fp8 cache the object shrinks ratio/2 times
    k_scale, v_scale  vLLM's fp8 KV scales (default 1.0, vLLM's own unless the checkpoint ships scales)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..defaults import RATIO, SINKS
from .fp8 import FP8_FORMATS, Fp8Cache

LAYOUTS = ("auto", "vllm-cpu")
KV_CACHE_DTYPES = ("auto", *FP8_FORMATS)


@dataclass(frozen=True)
class SerdeOptions:
    """The adapter JSON's serde kwargs, validated (unknown keys are errors, not silently ignored)."""

    calibration: str
    ratio: float = RATIO
    device: str = "cpu"
    fixed_size: bool = True
    max_workers: int = 1
    sinks: int = SINKS
    max_position: int = 131072
    chunk_size: int = 0
    layout: str = "auto"
    block_size: int = 128
    master_key_path: str = ""
    aes_bits: int = 256
    kv_cache_dtype: str = "auto"
    k_scale: float = 1.0
    v_scale: float = 1.0

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, object], source: str = "kvtc serde: ") -> SerdeOptions:
        """Validated options; ``ValueError`` naming ``source`` + the key. The one parser of the MP serde's JSON
        and the classic plugin's ``kvtc.*`` keys (``source="kvtc."``), so both read a value the same way."""
        known = {f.name: f for f in fields(cls)}
        unknown = set(kwargs) - set(known)
        if unknown:
            raise ValueError(f"{source}unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        if not isinstance(kwargs.get("calibration"), str) or not kwargs["calibration"]:
            raise ValueError(f"{source}calibration (a calibration file or directory) is required")
        kinds = {"float": float, "int": int, "bool": bool, "str": str}
        options = cls(**{name: typed(name, value, kinds[str(known[name].type)], source)
                         for name, value in kwargs.items()})
        if (not options.ratio >= 1 or options.max_workers < 1 or options.sinks < 0 or options.max_position < 1
                or options.chunk_size < 0 or options.block_size < 1):
            raise ValueError(f"{source}out-of-range option in {kwargs}")
        if options.layout not in LAYOUTS:
            raise ValueError(f"{source}layout must be one of {LAYOUTS}, got {options.layout!r}")
        if options.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"{source}kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {options.kv_cache_dtype!r}")
        if not (0 < options.k_scale < float("inf") and 0 < options.v_scale < float("inf")):
            raise ValueError(f"{source}k_scale and v_scale must be positive and finite")
        return options

    @property
    def paged_block_size(self) -> int:
        """vLLM's block size when 3-D objects are vLLM-CPU's paged blocks, else 0."""
        return self.block_size if self.layout == "vllm-cpu" else 0

    @property
    def fp8(self) -> Fp8Cache | None:
        """The fp8 format ``uint8`` objects hold, or None when the cache is 16-bit."""
        return Fp8Cache.from_option(self.kv_cache_dtype, self.k_scale, self.v_scale)


def typed(name: str, value: object, kind: type, source: str = "kvtc serde: ") -> object:
    """``value`` if it is a ``kind`` (an int is also a float; a bool is not a number); no coercion from
    strings, so ``"16"`` is an error in JSON and YAML alike."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ValueError(f"{source}{name} must be {kind.__name__}, got {value!r}")
    return value
