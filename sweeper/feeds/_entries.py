"""Cache entry files: ``<cache.dir>/<key>.feat``, a checksummed JSON header and the raw tensor.

The header (4 KiB, so the data starts page-aligned, ready for a memory map) holds the key,
dtype, shape, size, blake2b checksum and recorded fill time. Files are written to a temporary
name and renamed into place, so readers see a whole entry or none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from sweeper.errors import cannot_write
from sweeper.feeds._keys import FORMAT, chunked_digest, tensor_bytes

MAGIC = b"SWEEPER-FEATURES\n"
HEADER_BYTES = 4096  # data starts page-aligned, ready for a memory map
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CorruptEntry(Exception):
    """An entry file that must not be used: truncated, damaged, or of another key or format."""


def _checksum(data: torch.Tensor) -> str:
    return chunked_digest(tensor_bytes(data)).hex()


def write(path: Path, key: str, rows: torch.Tensor, meta: dict) -> dict:
    """Write ``rows`` as the entry ``key`` at ``path``, atomically; returns its header."""
    meta = {**meta, "format": FORMAT, "key": key, "dtype": str(rows.dtype).removeprefix("torch."),
            "shape": list(rows.shape), "nbytes": rows.numel() * rows.element_size(),
            "checksum": _checksum(rows)}
    header = MAGIC + json.dumps(meta).encode()
    assert len(header) < HEADER_BYTES, "entry header too long"
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.ljust(HEADER_BYTES, b" "))
            f.write(tensor_bytes(rows))
        # No fsync: an entry torn by a crash fails its size or checksum check and is rebuilt,
        # and forcing GBs of entries to disk would cost seconds per entry.
        os.replace(tmp, path)  # readers see the whole entry or none
    except OSError as e:  # a full disk: no partial entry is left behind
        tmp.unlink(missing_ok=True)
        raise cannot_write("the feature cache entry", path, e, "paths.cache") from None
    return meta


def read_header(path: Path, key: str) -> dict:
    """The header of entry ``key`` at ``path``, checked; raises :class:`CorruptEntry`."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or not head.startswith(MAGIC):
        raise CorruptEntry("no valid header")
    try:
        meta = json.loads(head[len(MAGIC):].decode())
    except ValueError as e:
        raise CorruptEntry(f"unreadable header ({e})") from None
    if meta.get("format") != FORMAT or meta.get("key") != key:
        raise CorruptEntry("header of another format or key")
    size = path.stat().st_size
    if size != HEADER_BYTES + meta["nbytes"]:
        raise CorruptEntry(f"size {size} B, header says {HEADER_BYTES + meta['nbytes']} B")
    return meta


def read(path: Path, key: str, in_memory: bool) -> tuple[torch.Tensor, dict]:
    """An entry's rows, read into RAM or memory-mapped; raises :class:`CorruptEntry`."""
    meta = read_header(path, key)
    if in_memory:
        raw = torch.from_file(str(path), shared=False, size=HEADER_BYTES + meta["nbytes"],
                              dtype=torch.uint8)[HEADER_BYTES:]
    else:  # copy-on-write map: pages come from the file, nothing is written back
        raw = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", offset=HEADER_BYTES,
                                         shape=(meta["nbytes"],)))
    rows = raw.view(DTYPES[meta["dtype"]]).view(meta["shape"])
    if _checksum(rows) != meta["checksum"]:
        raise CorruptEntry("checksum mismatch")
    return rows, meta
