"""What identifies a cache entry: a key per (weights up to the cut, split, normalisation, dtype,
device, cut), made of content hashes, so that anything that changes the outputs changes the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sweeper.data import Normalize, Split
from sweeper.model import FreezeNet

FORMAT = 2  # of keys and entry files: a new format never reads an old entry (2: chunked digests)
DIGEST_CHUNK = 32 * 2**20


def new_hash() -> Any:
    """The hash of keys and checksums (16-byte blake2b)."""
    return hashlib.blake2b(digest_size=16)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's raw bytes (on the CPU), to hash or to write."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def chunked_digest(data: memoryview) -> bytes:
    """blake2b of the blake2b digests of ``data``'s 32 MiB chunks, hashed on several threads
    (hashlib lets go of the GIL): the GBs of an entry at 224 px take a fraction of a second."""
    chunks = [data[i:i + DIGEST_CHUNK] for i in range(0, len(data), DIGEST_CHUNK)]
    one = lambda c: hashlib.blake2b(c, digest_size=16).digest()  # noqa: E731
    if len(chunks) > 1:
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            parts = list(pool.map(one, chunks))
    else:
        parts = [one(c) for c in chunks]
    h = new_hash()
    for part in parts:
        h.update(part)
    return h.digest()


def unit_digest(unit: nn.Module) -> str:
    """Hash of a unit's architecture and every parameter and buffer value."""
    h = new_hash()
    h.update(repr(unit).encode())
    for name, t in unit.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


# id(images) -> (the images, their version counter then, their hash): a study's trials share
# the decoded splits (sweeper.data.load), whose images hash once (at 224 px, 250 MB a split).
_IMAGES_DIGESTS: dict[int, tuple[weakref.ref, int, bytes]] = {}


def _images_digest(images: torch.Tensor) -> bytes:
    """:func:`chunked_digest` of ``images``, computed again only for another tensor or once
    it has changed in place (torch bumps its version counter)."""
    known = _IMAGES_DIGESTS.get(id(images))
    if known is not None and known[0]() is images and known[1] == images._version:
        return known[2]
    digest = chunked_digest(tensor_bytes(images))
    for key in [k for k, (ref, _, _) in _IMAGES_DIGESTS.items() if ref() is None]:
        del _IMAGES_DIGESTS[key]  # (tensors gone since)
    _IMAGES_DIGESTS[id(images)] = (weakref.ref(images), images._version, digest)
    return digest


def split_digest(split: Split, normalize: Normalize) -> str:
    """Hash of a split's image contents (in order) and of the normalisation applied to them."""
    h = new_hash()
    h.update(f"{split.images.dtype}:{tuple(split.images.shape)}".encode())
    h.update(_images_digest(split.images))
    for stat in normalize.stats:  # the same bytes as the float32 buffers, read on the host
        h.update(tensor_bytes(torch.tensor(stat, dtype=torch.float32)))
    return h.hexdigest()


@dataclass
class Prefix:
    """What determines a split's prefix outputs at every cut: one key per cut."""

    model: FreezeNet
    split: Split
    normalize: Normalize
    dtype: torch.dtype
    device: torch.device
    amp: bool
    data: str  # split_digest
    units: list[str]  # unit_digest of each frozen unit

    def key(self, cut: int) -> str:
        h = new_hash()
        h.update(json.dumps({"format": FORMAT, "data": self.data, "dtype": str(self.dtype),
                             "device": self.device.type, "amp": self.amp,
                             "units": self.units[:cut]}).encode())
        return h.hexdigest()
