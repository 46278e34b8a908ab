"""Sealed blobs: the ``kvtc`` serde's optional AES-GCM layer, keyed per tenant (``cache_salt``).

Threat model. Storage (a shared Redis, a disk, anyone who can write to them) is untrusted; the LMCache
server holding the master key is trusted. Sealing gives every tenant's stored KV confidentiality and
integrity at rest: a blob is readable only with the key LMCache's own ``HkdfKeyProvider`` derives for its
``cache_salt``, and it is bound to the whole ``ObjectKey`` it was stored under (AAD), so a blob copied to
another tenant's key, another chunk hash, model, rank or group fails to open — a cache miss, never another
tenant's or another prefix's KV. A sealed serde refuses unsealed objects (no downgrade by planting a
plaintext blob). Not hidden: which keys exist, when they are written and read, and the stored size (fixed
per layout and ratio with ``fixed_size``, the default; the true compressed size otherwise). L1 (CPU RAM of
the server) holds plaintext, as with LMCache's ``aesgcm`` serde.

Frame, little-endian (the kvtc blob, padded as the unsealed serde would store it, is the plaintext)::

    offset  size  field
    0       4     magic b"KVTS"
    4       1     version (1)
    5       1     AES key bits / 8 (16 or 32)
    6       12    nonce (random per blob)
    18      4     u32 ciphertext length, tag included
    22      n     AES-GCM ciphertext || 16-byte tag; AAD = bytes 0..22 + the canonical ObjectKey
    22+n    ...   zero padding (fixed-size tiers)

Random 96-bit nonces keep the usual bound of 2^32 blobs per tenant key before a collision becomes likely.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from lmcache.v1.distributed.api import ObjectKey
from lmcache.v1.distributed.serde.key_provider import HkdfKeyProvider, KeyProvider

from ..errors import SealError

MAGIC = b"KVTS"
VERSION = 1
_HEADER = struct.Struct("<4sBB12sI")
_TAG = 16
OVERHEAD = _HEADER.size + _TAG
AES_BITS = (128, 256)
#: HKDF ``info`` prefix: keys derived for kvtc never equal those of LMCache's ``aesgcm`` serde
HKDF_INFO_PREFIX = b"lmcache-kvtc-sealed-v1"


class Sealer:
    """Seals and opens stored objects with one AES key per ``cache_salt`` (thread-safe)."""

    def __init__(self, keys: KeyProvider, aes_bits: int = 256):
        if aes_bits not in AES_BITS:
            raise ValueError(f"kvtc serde: aes_bits must be one of {AES_BITS}, got {aes_bits}")
        self.keys, self.key_bytes = keys, aes_bits // 8

    @classmethod
    def from_master_key_file(cls, path: str, aes_bits: int = 256) -> Sealer:
        master = Path(path).read_bytes()
        if len(master) < 32:
            raise ValueError(f"kvtc serde: master key {path} has {len(master)} bytes; at least 32 are needed")
        return cls(HkdfKeyProvider(master, key_len=aes_bits // 8, info_prefix=HKDF_INFO_PREFIX), aes_bits)

    def seal(self, plaintext: bytes, key: ObjectKey | None) -> bytes:
        key = _required(key)
        header = _HEADER.pack(MAGIC, VERSION, self.key_bytes, os.urandom(12), len(plaintext) + _TAG)
        aead = AESGCM(self.keys.get_key(key.cache_salt))
        return header + aead.encrypt(header[6:18], plaintext, header + _associated(key))

    def open(self, frame: memoryview | bytes, key: ObjectKey | None) -> bytes:
        """The plaintext of a sealed object; ``SealError`` for anything not sealed for exactly this key."""
        key = _required(key)
        if len(frame) < OVERHEAD or bytes(frame[:4]) != MAGIC:
            raise SealError("not a sealed kvtc object (this serde stores every object sealed)")
        _, version, key_bytes, nonce, length = _HEADER.unpack_from(frame)
        if version != VERSION or key_bytes != self.key_bytes:
            raise SealError(f"sealed object of version {version} with {key_bytes * 8}-bit keys; "
                            f"this serde reads version {VERSION} with {self.key_bytes * 8}-bit keys")
        if not _TAG <= length <= len(frame) - _HEADER.size:
            raise SealError(f"sealed object declares {length} ciphertext bytes; {len(frame)} are stored")
        header = bytes(frame[: _HEADER.size])
        try:
            return AESGCM(self.keys.get_key(key.cache_salt)).decrypt(
                nonce, bytes(frame[_HEADER.size : _HEADER.size + length]), header + _associated(key))
        except InvalidTag:
            raise SealError("sealed object does not open under this key (another tenant, another key, "
                            "or changed bytes)") from None


def _required(key: ObjectKey | None) -> ObjectKey:
    if key is None:
        raise SealError("sealing needs the object's key (its cache_salt selects the tenant key)")
    return key


def _associated(key: ObjectKey) -> bytes:
    """Every field of the key, length-prefixed, so no two keys share associated data."""
    fields = [key.chunk_hash, key.model_name, str(key.kv_rank), str(key.object_group_id), key.cache_salt]
    encoded = [f if isinstance(f, bytes) else f.encode() for f in fields]
    return b"".join(struct.pack("<I", len(f)) + f for f in encoded)
