"""Where a trial's tensors live and how they get there: the one place that decides the device.

``trainer.device`` is resolved once, to an *indexed* device (``cuda:0``, never a bare
``cuda``): a tensor reports an indexed device, and a bare ``cuda`` compares unequal to it, so
a tensor already on the GPU would look like it still had to be copied (that is how a CUDA
tensor once got pinned). On a GPU:

- rows that every epoch reads (the train and val images or cached frozen-prefix outputs) are
  copied to the GPU once when they fit :func:`rows_budget`, or computed there by a cache fill,
  and batches are gathered there; a fill's copy for the host is made on a side stream by
  another thread (:func:`download`);
- rows that stay on the host (over the budget, or read once) are gathered per batch straight
  into page-locked memory and copied without blocking (:func:`gather`); only tensors on the
  CPU are ever pinned;
- models and 4-D inputs are channels_last, autocast is bf16 (``trainer.amp``), and cuDNN
  picks its fastest kernels unless ``trainer.deterministic`` is set.

On the CPU all of this is a no-op, but for forwards without autograd, which take
channels_last inputs there too (:func:`layout`). The host's memory allocator is tuned for any device
(:func:`keep_freed_memory`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
from torch import nn

from sweeper.errors import UserError

Transfer = Literal["none", "pinned", "plain"]


def indexed(device: torch.device | str) -> torch.device:
    """``device`` with its index: a bare ``cuda`` is the current CUDA device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_device(name: str) -> torch.device:
    """``trainer.device`` as an indexed device: ``auto`` (the current GPU when CUDA is there,
    else the CPU), ``cpu``, ``cuda`` (the current GPU) or ``cuda:N``."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"trainer.device={name} is not a device: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"trainer.device={name} but no CUDA device is available; "
                            "use trainer.device=auto or trainer.device=cpu.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"trainer.device={name} but this machine has {count} CUDA device(s): "
                            f"use cuda:0..cuda:{count - 1}, or auto.")
    return indexed(device)


# glibc's mallopt() parameters (<malloc.h>), and what keep_freed_memory sets them to: the
# largest mmap threshold glibc takes on 64 bits, and no trimming below 2 GiB of free heap (the
# largest value an int holds).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 32 * 2**20, 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a process frees for its next allocations (blocks
    up to 32 MiB from its heap, none of it handed back while less than 2 GiB is free), once
    per process; True when it did.

    By default glibc maps every large block afresh and hands freed memory back, so that each
    training step, cache fill and model copy faults its pages in (and has them zeroed) again:
    1.5 million page faults in the default study on 2 CPU cores, 0.35 million tuned (its
    effect on the study's time is within this machine's noise); the process keeps its peak
    memory instead of handing it back between trials. The same as starting Python with
    ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set (as PyTorch's CPU tuning
    guide suggests of a different allocator); left alone when either, or
    ``GLIBC_TUNABLES``, is set, and where the C library is not glibc."""
    if (platform.libc_ver()[0] != "glibc"
            or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                             "GLIBC_TUNABLES"))):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def configure(device: torch.device, deterministic: bool) -> None:
    """Process-wide settings for a trial on ``device`` (set for every trial, so one trial's
    settings never leak into the next one in the same process)."""
    keep_freed_memory()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # A few CUDA kernels (AdaptiveAvgPool2d's backward, among others) have no deterministic
    # version: on a GPU they warn instead of failing the trial, and reruns match closely
    # rather than bit for bit. On the CPU every kernel the trials use is deterministic.
    torch.use_deterministic_algorithms(deterministic, warn_only=device.type == "cuda")
    # cuDNN tries its kernels once per input shape and keeps the fastest (not deterministic).
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    if device.type == "cuda":
        torch.cuda.set_device(device)  # so that whatever says "cuda" means this device


def autocast(device: torch.device, amp: bool) -> AbstractContextManager:
    """bf16 autocast on a GPU when ``amp`` (``trainer.amp``); nothing on the CPU."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def channels_last(device: torch.device) -> bool:
    """Whether models and 4-D inputs on ``device`` use the channels_last layout (GPU convs
    run fastest in it; on the CPU it only adds copies)."""
    return device.type == "cuda"


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` moved to ``device``, in place, channels_last there where that pays."""
    fmt = torch.channels_last if channels_last(device) else torch.preserve_format
    return model.to(device, memory_format=fmt)


def layout(x: torch.Tensor, training: bool) -> torch.Tensor:
    """A batch in the memory layout its forward runs fastest in on its device (the values are
    the same, only their order in memory changes): channels_last on a GPU; on the CPU,
    channels_last for a forward without autograd (frozen units, cache fills, evaluation:
    oneDNN's NHWC convolutions infer about 12% faster here) and the contiguous layout for
    training (their backward is slower in NHWC). Anything but a 4-D batch is left as it is."""
    if x.dim() != 4:
        return x
    nhwc = channels_last(x.device) or not training
    return x.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


def as_input(x: torch.Tensor) -> torch.Tensor:
    """A batch as the network's float32 input (autocast casts it further), channels_last for
    a 4-D batch on a GPU; one copy at most."""
    if x.dim() == 4 and channels_last(x.device):
        return x.to(torch.float32, memory_format=torch.channels_last)
    return x.float()


# --- rows: once to the device, or per batch -------------------------------------------------

def transfer(src: torch.device, dst: torch.device) -> Transfer:
    """How rows on ``src`` reach ``dst``: ``none`` (they are there), ``pinned`` (CPU rows for a
    GPU: through page-locked memory, without blocking) or ``plain`` (any other pair)."""
    src, dst = indexed(src), indexed(dst)
    if src == dst:
        return "none"
    if src.type == "cpu" and dst.type == "cuda":
        return "pinned"
    return "plain"


def keep_on_device(nbytes: int, device: torch.device, budget: int) -> bool:
    """Whether ``nbytes`` of rows that every epoch reads are copied to ``device`` once and kept
    there for the trial, instead of copied batch by batch: on a GPU, when they fit ``budget``
    (in RAM or memory-mapped alike: one copy of the whole costs what one epoch's batches do)."""
    return device.type == "cuda" and nbytes <= budget


def rows_budget(device: torch.device, cap_mb: float | None = None, placed: int = 0) -> int:
    """Bytes of rows a trial may keep on ``device``: ``cap_mb`` (``cache.device_budget_mb``)
    when set, else half of the GPU memory free to this process (free on the device plus what
    its allocator holds unused, plus the ``placed`` bytes of the trial's rows already there),
    leaving the rest to the model's activations and to other processes on the same GPU. 0 on
    the CPU."""
    if device.type != "cuda":
        return 0
    if cap_mb is not None:
        return int(float(cap_mb) * 2**20)
    free, _ = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return (free + held + placed) // 2


def ready_event(device: torch.device) -> torch.cuda.Event | None:
    """On a GPU, an event after the work queued so far on ``device``'s current stream (for
    :func:`download` in another thread); None on the CPU."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


STAGE_BYTES = 64 * 2**20  # the page-locked buffer a download goes through


def download(rows: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
    """A CPU copy of ``rows`` once ``ready`` (:func:`ready_event`) has passed, for a thread
    other than the training loop's. On a GPU it is copied on a side stream through a
    page-locked buffer, :data:`STAGE_BYTES` at a time: one copy straight into pageable memory
    holds the driver's staging path for its whole length (about 1 s per GB of new host
    memory), and every small copy the training thread made meanwhile (a loss read by
    ``.item()``, a key's bytes) waited behind it, 5 s of the GPU benchmark's study on an H200."""
    if rows.device.type != "cuda":
        return rows
    host = torch.empty(rows.shape, dtype=rows.dtype)
    src = rows.contiguous().view(-1).view(torch.uint8)
    dst = host.view(-1).view(torch.uint8)
    if not len(src):
        return host
    stage = torch.empty(min(STAGE_BYTES, len(src)), dtype=torch.uint8, pin_memory=True)
    side = torch.cuda.Stream(rows.device)
    if ready is not None:
        side.wait_event(ready)
    copied = torch.cuda.Event()
    with torch.cuda.stream(side):
        for start in range(0, len(src), len(stage)):
            n = min(len(stage), len(src) - start)
            stage[:n].copy_(src[start:start + n], non_blocking=True)
            copied.record(side)
            copied.synchronize()  # (this thread only; the training stream goes on)
            dst[start:start + n].copy_(stage[:n])
    return host


def _count(rows: torch.Tensor, idx: torch.Tensor | slice) -> int:
    return len(range(*idx.indices(len(rows)))) if isinstance(idx, slice) else len(idx)


def _pinned(rows: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
    """``rows[idx]`` (CPU) gathered straight into page-locked memory. torch's caching host
    allocator hands the buffer out again only once the copies that read it have finished."""
    host = torch.empty((_count(rows, idx), *rows.shape[1:]), dtype=rows.dtype, pin_memory=True)
    if isinstance(idx, slice):
        host.copy_(rows[idx])
    else:
        torch.index_select(rows, 0, idx, out=host)
    return host


def gather(rows: torch.Tensor, idx: torch.Tensor | slice, device: torch.device) -> torch.Tensor:
    """``rows[idx]`` on ``device`` (``idx`` on the rows' device): indexed where the rows live,
    and for CPU rows bound for a GPU gathered into page-locked memory, copied without
    blocking (the GPU keeps working on earlier batches meanwhile)."""
    if rows.device == device:  # the common case, every step on a GPU: decided without a call
        return rows[idx]
    how = transfer(rows.device, device)
    if how == "none":
        return rows[idx]
    if how == "plain":
        return rows[idx].to(device)
    return _pinned(rows, idx).to(device, non_blocking=True)


def upload(rows: torch.Tensor, device: torch.device, chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
    """A copy of ``rows`` on ``device``; from the CPU to a GPU in chunks through page-locked
    buffers (rows may be memory-mapped and larger than any one buffer should be)."""
    if transfer(rows.device, device) != "pinned":
        return rows.to(device)
    out = torch.empty(rows.shape, dtype=rows.dtype, device=device)
    row_bytes = max(1, rows[0].numel() * rows.element_size()) if len(rows) else 1
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, len(rows), step):
        out[start:start + step].copy_(_pinned(rows, slice(start, start + step)), non_blocking=True)
    return out
