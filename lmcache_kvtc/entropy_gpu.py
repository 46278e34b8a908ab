"""GPU lossless stage: nvCOMP ``Deflate`` in RAW mode, writing the container :class:`DeflateCPU` writes.

Why RAW Deflate: each ≤ 64 KiB chunk is then a bare RFC 1951 stream, which zlib reads and writes too, so a
blob made on a GPU decodes on a CPU and the reverse. The chunking, the 16-byte aligned offsets and the index
are ours, exactly as in :mod:`.entropy`; only the bytes inside a chunk may differ between encoders.

Why detection by trying: ``import nvidia.nvcomp`` succeeds on a machine without a GPU and
every ``Codec(...)`` raises there, so :func:`select_coder` builds a codec and round-trips a
small buffer against zlib both ways before trusting it, and caches the verdict.

Why our own buffers on both sides (``encode(..., out=)``, ``decode(..., out=)``): nvCOMP 6.0.0.12 aborted the
process with a double free when tensors made by ``torch.from_dlpack`` from the entries of a BatchArray it had
allocated were freed (H200, torch 2.11). The probe in :func:`probe` runs every call this module makes once
before the coder is trusted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from .entropy import CHUNK_ALIGNMENT, CHUNK_SIZE, ChunkEntry, DeflateCPU, EntropyCoder, Section, check_index
from .errors import CorruptBlobError

log = logging.getLogger(__name__)

#: nvCOMP Deflate algorithm_type 0: entropy-only, the GPU analogue of DeflateCPU's Huffman-only default.
ENTROPY_ONLY = 0


def _aligned(n: int) -> int:
    return -(-n // CHUNK_ALIGNMENT) * CHUNK_ALIGNMENT


class DeflateNvcomp:
    """Raw DEFLATE chunks coded on a CUDA device by nvCOMP; drop-in for :class:`DeflateCPU`.

    ``nvcomp`` injects the module (tests use a zlib stand-in since no GPU exists there).
    ``sizes_config``: decode with a config built from the index's raw sizes (no stream walk,
    no sync); ``False`` lets nvCOMP walk the RAW streams itself (slow, but needs nothing more).
    """

    def __init__(self, device: str | torch.device = "cuda", algorithm_type: int = ENTROPY_ONLY,
                 nvcomp: ModuleType | None = None, sizes_config: bool = True):
        if nvcomp is None:
            import nvidia.nvcomp as nvcomp
        self.nv = nvcomp
        self.device = torch.device(device)
        self.algorithm_type = algorithm_type
        self.sizes_config = sizes_config
        self._codecs: dict[int, object] = {}
        self._capacity: int | None = None
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._codec(0)  # raises here on a machine where nvCOMP cannot run (before touching torch.cuda)
        if cuda and self.device.index is None:  # "cuda" -> "cuda:N": tensors report their device with an index
            self.device = torch.device("cuda", torch.cuda.current_device())
        # A private non-default stream: handle 0 could read as "unset" and make nvCOMP use its own stream.
        self._side = torch.cuda.Stream(self.device) if cuda else None

    # -- plumbing ---------------------------------------------------------------------------
    def _codec(self, stream: int):
        codec = self._codecs.get(stream)
        if codec is None:
            kwargs = {"algorithm": "Deflate", "bitstream_kind": self.nv.BitstreamKind.RAW,
                      "algorithm_type": self.algorithm_type}
            if self.device.type == "cuda" and self.device.index is not None:
                kwargs["device_id"] = self.device.index
            if stream:
                kwargs["cuda_stream"] = stream
            codec = self._codecs[stream] = self.nv.Codec(**kwargs)
        return codec

    @contextlib.contextmanager
    def _on_side_stream(self):
        """Run torch and nvCOMP work in order on one stream, ordered after the caller's stream."""
        if self._side is None:
            yield 0
            return
        caller = torch.cuda.current_stream(self.device)
        self._side.wait_stream(caller)
        with torch.cuda.stream(self._side):
            yield self._side.cuda_stream
        caller.wait_stream(self._side)

    def _place(self, data: Section, dst: torch.Tensor | None = None) -> torch.Tensor:
        """Copy ``data`` (device tensor or host bytes, through pinned memory) into ``dst`` or a new device tensor."""
        if isinstance(data, torch.Tensor):
            src = data.contiguous().view(-1).view(torch.uint8)
        else:
            view = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
            src = torch.empty(len(view), dtype=torch.uint8, pin_memory=self._side is not None)
            src.numpy()[:] = view
        if dst is None:
            return src.to(self.device, non_blocking=True)
        return dst.copy_(src, non_blocking=True)

    def _chunk_capacity(self) -> int:
        """nvCOMP's bound on one compressed chunk (aligned): the slot each chunk is encoded into."""
        if self._capacity is None:
            probe = self.nv.as_array(torch.zeros(CHUNK_SIZE, dtype=torch.uint8, device=self.device))
            self._capacity = _aligned(int(self._codec(0).get_max_comp_buffer_size(probe)))
        return self._capacity

    # -- encode -----------------------------------------------------------------------------
    def compress(self, sections: Sequence[Section]) -> tuple[bytes, list[ChunkEntry]]:
        """Same contract as :meth:`DeflateCPU.compress` (chunks never span two sections)."""
        return self.compress_batch([sections])[0]

    def compress_batch(self, objects: Sequence[Sequence[Section]]) -> list[tuple[bytes, list[ChunkEntry]]]:
        """Code the chunks of many objects in ONE nvCOMP call; one ``(payload, index)`` per object.

        Sections are placed at 16-byte aligned offsets of one staging buffer (nvCOMP needs
        aligned chunk addresses); the compressed chunks are gathered on the device into the
        DeflateCPU layout and copied to the host once.
        """
        spans: list[tuple[int, int, int]] = []  # (object, staging offset, raw size)
        placed: list[tuple[int, Section, int]] = []
        position = 0
        for o, sections in enumerate(objects):
            for section in sections:
                n = section.numel() * section.element_size() if isinstance(section, torch.Tensor) else len(section)
                spans += [(o, position + b, min(CHUNK_SIZE, n - b)) for b in range(0, n, CHUNK_SIZE)]
                placed.append((position, section, n))
                position = _aligned(position + n)
        results: list[tuple[bytes, list[ChunkEntry]]] = [(b"", []) for _ in objects]
        if not spans:
            return results
        with self._on_side_stream() as stream:
            staging = torch.empty(position, dtype=torch.uint8, device=self.device)
            for offset, section, n in placed:
                if n:
                    self._place(section, staging[offset : offset + n])
            codec, capacity = self._codec(stream), self._chunk_capacity()
            # Into our own buffer: nvCOMP 6.0.0.12 aborts the process (double free) when tensors made with
            # torch.from_dlpack of the entries of a BatchArray it allocated are freed (seen on an H200, torch 2.11).
            compressed = torch.empty(len(spans) * capacity, dtype=torch.uint8, device=self.device)
            batch = codec.encode(
                self.nv.as_arrays(staging, [s[1] for s in spans], [s[2] for s in spans], cuda_stream=stream),
                out=self.nv.as_arrays(compressed, [i * capacity for i in range(len(spans))],
                                      [capacity] * len(spans), cuda_stream=stream))
            sizes = list(batch.buffer_sizes)  # waits for the encode
            if any(not 0 < n < capacity for n in sizes):
                raise RuntimeError(f"nvCOMP reported compressed sizes {sizes[:4]}... for chunks of {capacity} bytes")
            pad = torch.zeros(CHUNK_ALIGNMENT, dtype=torch.uint8, device=self.device)
            pieces: list[torch.Tensor] = []
            bounds = [[0, 0] for _ in objects]  # per object: [start, end) in the gathered buffer
            total = 0
            for i, (o, _, raw) in enumerate(spans):
                if not results[o][1]:
                    bounds[o][0] = total
                results[o][1].append(ChunkEntry(total - bounds[o][0], sizes[i], raw))
                bounds[o][1] = total + sizes[i]
                pieces += [compressed[i * capacity : i * capacity + sizes[i]], pad[: -sizes[i] % CHUNK_ALIGNMENT]]
                total += _aligned(sizes[i])
            host = torch.cat(pieces).cpu().numpy().tobytes()  # one device-to-host copy; synchronizes
        return [(host[start:end], index) for (start, end), (_, index) in zip(bounds, results, strict=True)]

    # -- decode -----------------------------------------------------------------------------
    def decompress(self, payload: memoryview, index: list[ChunkEntry], total: int) -> bytearray:
        """Same contract as :meth:`DeflateCPU.decompress` (host bytes in, host bytes out)."""
        return bytearray(self.decompress_tensor(payload, index, total).cpu().numpy())

    def decompress_tensor(self, payload: Section, index: list[ChunkEntry], total: int,
                          out: torch.Tensor | None = None) -> torch.Tensor:
        """Inflate into ``out`` (a preallocated contiguous uint8 device tensor of ``total`` bytes) or a new one.

        The payload may already live on the device (a tensor). Chunks whose output address is
        not aligned for nvCOMP are inflated into a scratch buffer and moved into place.
        """
        check_index(index, len(payload) if not isinstance(payload, torch.Tensor) else payload.numel(), total)
        if out is None:  # zeros: a chunk that inflates short of its declared size (not reported) leaves zeros
            out = torch.zeros(total, dtype=torch.uint8, device=self.device)
        if out.dtype != torch.uint8 or out.numel() != total or not out.is_contiguous() or out.device != self.device:
            raise ValueError(f"out must be a contiguous uint8 tensor of {total} bytes on {self.device}")
        if not index:
            return out
        with self._on_side_stream() as stream:
            codec = self._codec(stream)
            align = max(int(codec.get_required_decompression_alignment()), 1)
            src = self._place(payload)
            offsets = [e.offset for e in index]
            if src.data_ptr() % align or any(o % align for o in offsets):
                src, offsets = _realign(src, index, self.device)
            raw = [e.raw for e in index]
            starts = np.concatenate(([0], np.cumsum(raw)[:-1])).tolist()
            direct = all((out.data_ptr() + s) % align == 0 for s in starts)
            target = out if direct else torch.zeros(len(index) * CHUNK_SIZE, dtype=torch.uint8, device=self.device)
            slots = starts if direct else [i * CHUNK_SIZE for i in range(len(index))]
            config = codec.decompression_config(codec.compression_config(raw)) if self.sizes_config else None
            try:
                compressed = self.nv.as_arrays(src, offsets, [e.compressed for e in index], cuda_stream=stream)
                result = codec.decode(compressed, out=self.nv.as_arrays(target, slots, raw, cuda_stream=stream),
                                      decompression_config=config)
                decoded = list(result.buffer_sizes)  # waits for the decode
            except (RuntimeError, ValueError) as exc:
                raise CorruptBlobError(f"nvCOMP could not inflate the payload: {exc}") from exc
            bad = [i for i, (d, r) in enumerate(zip(decoded, raw, strict=True)) if d != r]
            if bad:
                raise CorruptBlobError(f"chunk at payload offset {index[bad[0]].offset} inflates to the wrong size")
            if not direct:
                torch.cat([target[s : s + r] for s, r in zip(slots, raw, strict=True)], out=out)
        return out


def _realign(src: torch.Tensor, index: list[ChunkEntry], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Copy compressed chunks to 16-byte aligned offsets (a valid blob from another writer may not align them)."""
    pad = torch.zeros(CHUNK_ALIGNMENT, dtype=torch.uint8, device=device)
    pieces, offsets, position = [], [], 0
    for e in index:
        pieces += [src[e.offset : e.offset + e.compressed], pad[: -e.compressed % CHUNK_ALIGNMENT]]
        offsets.append(position)
        position += _aligned(e.compressed)
    return torch.cat(pieces), offsets


# -- detection ------------------------------------------------------------------------------
#: per device: None = nvCOMP unusable there; else the ``sizes_config`` that passed the probe.
_VERDICTS: dict[str, bool | None] = {}
_LOCK = threading.Lock()


def probe(coder: DeflateNvcomp) -> None:
    """Raise unless ``coder`` round-trips a small two-section buffer against zlib in both directions."""
    data = (np.random.default_rng(0).integers(0, 8, CHUNK_SIZE + 5000, dtype=np.uint8) * 3).tobytes()
    sections = [data[:1000], data[1000:]]  # a short section, then a full chunk plus a ragged tail
    payload, index = coder.compress(sections)
    if DeflateCPU.decompress(memoryview(payload), index, len(data)) != data:
        raise RuntimeError("nvCOMP output does not inflate with zlib to the input")
    cpu_payload, cpu_index = DeflateCPU().compress(sections)
    if coder.decompress(memoryview(cpu_payload), cpu_index, len(data)) != data:
        raise RuntimeError("nvCOMP does not inflate zlib raw DEFLATE to the input")


def _detect(device: torch.device) -> bool | None:
    coder = DeflateNvcomp(device)  # ImportError, or nvCOMP's RuntimeError where no driver/GPU exists
    try:
        probe(coder)
    except Exception as first:  # noqa: BLE001 - retry the decode with nvCOMP's own RAW size walk
        coder.sizes_config = False
        try:
            probe(coder)
        except Exception as second:
            raise RuntimeError(f"{first}; without the sizes config: {second}") from second
    return coder.sizes_config


def select_coder(device: str | torch.device = "cuda") -> EntropyCoder:
    """The entropy coder for ``device``: nvCOMP when it works there, else :class:`DeflateCPU`.

    The verdict is cached per device (one log line, at the first call). A fresh coder is
    returned each time so codecs on different threads share no nvCOMP state.
    """
    device = torch.device(device)
    key = str(device)
    with _LOCK:
        if key not in _VERDICTS:
            verdict = None
            if device.type != "cuda":
                log.info("KVTC entropy coder for %s: CPU raw DEFLATE (zlib)", key)
            else:
                try:
                    verdict = _detect(device)
                    log.info("KVTC entropy coder for %s: nvCOMP raw DEFLATE (sync-free decode config: %s)",
                             key, verdict)
                except Exception as exc:  # noqa: BLE001 - any failure means "use the CPU", never fail the caller
                    log.warning("KVTC entropy coder for %s: nvCOMP unusable (%s: %s); falling back to CPU raw "
                                "DEFLATE (same blob format)", key, type(exc).__name__, exc)
            _VERDICTS[key] = verdict
        verdict = _VERDICTS[key]
    return DeflateCPU() if verdict is None else DeflateNvcomp(device, sizes_config=verdict)


def clear_detection_cache() -> None:
    """Forget cached verdicts (tests; or after installing nvCOMP in a running process)."""
    with _LOCK:
        _VERDICTS.clear()
