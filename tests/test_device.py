"""The device decisions, checked on the CPU with CUDA device objects: which device a trial gets,
what is pinned, what is copied to the GPU once, what stays where it is.

The first CUDA run of the project crashed on exactly such a decision (rows already on
``cuda:0`` compared unequal to a bare ``cuda`` and were pinned); these tests catch that class
of mistake without a GPU. Only ``torch.cuda``'s queries (is there a GPU, how many, how much
memory is free) are stood in for, never torch's tensors or copies; what needs a real GPU is
in ``tests/test_gpu.py`` (``pytest -m gpu``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sweeper import data as data_mod
from sweeper import device as dev
from sweeper import feeds
from sweeper.errors import UserError
from sweeper.model import build

CPU, CUDA0, CUDA1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture
def two_gpus(monkeypatch):
    """The answers of a machine with two GPUs, the first one current."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_trainer_device_resolves_once_to_an_indexed_device(two_gpus):
    for name, want in [("auto", CUDA0), ("cuda", CUDA0), ("cuda:0", CUDA0), ("cuda:1", CUDA1),
                       ("cpu", CPU)]:
        got = dev.resolve_device(name)
        assert got == want and (got.type == "cpu" or got.index is not None), name
    # A tensor on the GPU reports cuda:0: the resolved device must compare equal to it.
    assert dev.resolve_device("auto") == torch.device("cuda:0")


def test_auto_is_the_cpu_without_a_gpu(no_gpu):
    assert dev.resolve_device("auto") == CPU


@pytest.mark.parametrize("name,fixture,message", [
    ("cuda", "no_gpu", "no CUDA device is available"),
    ("cuda:1", "no_gpu", "no CUDA device is available"),
    ("cuda:2", "two_gpus", "use cuda:0..cuda:1"),
    ("gpu", "two_gpus", "is not a device"),
])
def test_a_device_that_cannot_work_is_a_user_error(name, fixture, message, request):
    request.getfixturevalue(fixture)
    with pytest.raises(UserError, match=message):
        dev.resolve_device(name)


def test_only_cpu_rows_bound_for_a_gpu_are_pinned(two_gpus):
    # The crash: rows already on cuda:0, the trial's device a bare "cuda".
    assert dev.transfer(CUDA0, torch.device("cuda")) == "none"
    assert dev.transfer(CUDA0, CUDA0) == "none"
    assert dev.transfer(CPU, CPU) == "none"
    assert dev.transfer(CPU, CUDA0) == "pinned"
    assert dev.transfer(CPU, torch.device("cuda")) == "pinned"
    # GPU rows are never pinned: to the CPU or another GPU they take an ordinary copy.
    assert dev.transfer(CUDA0, CPU) == "plain"
    assert dev.transfer(CUDA0, CUDA1) == "plain"


def test_rows_every_epoch_reads_go_to_the_gpu_once_when_they_fit():
    assert dev.keep_on_device(100, CUDA0, budget=100)
    assert not dev.keep_on_device(101, CUDA0, budget=100)  # over: copied per batch instead
    assert not dev.keep_on_device(1, CPU, budget=2**40)  # the CPU keeps rows where they are
    assert dev.rows_budget(CPU) == 0
    assert dev.rows_budget(CUDA0, cap_mb=0) == 0  # cache.device_budget_mb=0: every batch copied
    assert dev.rows_budget(CUDA0, cap_mb=1.5) == int(1.5 * 2**20)


def test_rows_a_fill_left_on_the_gpu_count_as_the_budget_they_took(monkeypatch):
    gb = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8 * gb, 80 * gb))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * gb)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * gb)
    # half of what is free to the process: 8 GB free on the device + 1 GB its allocator holds unused
    assert dev.rows_budget(CUDA0) == 9 * gb // 2
    # 2 GB of the trial's rows a cache fill left there count as free, as before they were
    # made: the trial places its rows within the same budget, whoever put them there
    assert dev.rows_budget(CUDA0, placed=2 * gb) == 11 * gb // 2
    assert dev.rows_budget(CUDA0, cap_mb=1024, placed=2 * gb) == gb  # a cap holds them all
    # the CPU has no second copy to make: no event to wait for, the rows are the host's
    rows = torch.arange(6)
    assert dev.ready_event(CPU) is None and dev.download(rows, None) is rows


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
def test_layout_and_precision_on_each_device():
    assert dev.channels_last(CUDA0) and not dev.channels_last(CPU)
    amp = dev.autocast(CUDA0, amp=True)  # (disabled here, where CUDA is absent)
    assert isinstance(amp, torch.autocast) and amp.device == "cuda" and amp.fast_dtype == torch.bfloat16
    assert not isinstance(dev.autocast(CUDA0, amp=False), torch.autocast)
    assert not isinstance(dev.autocast(CPU, amp=True), torch.autocast)
    # On the CPU, a batch becomes float32 in its own layout and a model stays contiguous.
    x = torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8)
    assert dev.as_input(x).dtype == torch.float32 and dev.as_input(x).is_contiguous()
    conv = dev.place_model(nn.Conv2d(3, 4, 3), CPU)
    assert conv.weight.is_contiguous() and conv.weight.device == CPU


def test_settings_of_one_trial_do_not_leak_into_the_next():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        dev.configure(CPU, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        dev.configure(CPU, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark  # autotuning is for the GPU
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def _feed(rows: torch.Tensor, mapped: bool = False) -> feeds.Feed:
    labels = torch.arange(len(rows))
    return feeds.Feed(rows, labels, dev.as_input, "filled", nbytes=rows.numel() * rows.element_size(),
                      mapped=mapped)


def test_on_the_cpu_a_feed_stays_put_and_batches_are_its_rows(tmp_path):
    rows = torch.randn(10, 3, 2, 2).half()
    mm = np.memmap(tmp_path / "rows", dtype=np.float16, mode="w+", shape=tuple(rows.shape))
    mm[:] = rows.numpy()
    for feed in (_feed(rows), _feed(torch.from_numpy(mm), mapped=True)):
        assert feed.on(CPU, budget=2**40) is feed
        idx = torch.tensor([7, 0, 3])
        x, y = feed.batch(idx, CPU)
        assert torch.equal(x, rows[idx]) and torch.equal(y, idx)
        x, y = feed.batch(slice(8, 12), CPU)  # the last, short batch
        assert torch.equal(x, rows[8:]) and torch.equal(y, torch.tensor([8, 9]))
        assert torch.equal(dev.upload(feed.rows, CPU), rows)
    assert _feed(rows).size_bytes == rows.numel() * 2 + 10 * 8  # rows and labels


def test_a_device_budget_that_is_not_a_size_is_a_user_error(make_cfg):
    cfg = make_cfg("cache.device_budget_mb=auto")
    data = data_mod.load(cfg.dataset)
    model, _ = build(cfg.backbone, len(data.classes), 2, None)
    with pytest.raises(UserError, match="cache.device_budget_mb=auto: use null"):
        feeds.for_trial(model, data, cfg.cache, None, CPU)


_FAULTS = """
import resource, sys, torch
from sweeper.device import configure, keep_freed_memory
configure(torch.device("cpu"), False)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # noqa: E731
def step():  # blocks of a few MB, allocated and freed as a training step's are
    a = torch.ones(3 * 2**20); b = torch.ones(5 * 2**20); del a; c = torch.ones(2**20); del b, c
per_step = []
for _ in range(20):
    before = faults()
    step()
    per_step.append(faults() - before)
print(keep_freed_memory(), sorted(per_step)[10])  # the median step's page faults
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc only")
@pytest.mark.parametrize("env", [{}, {"MALLOC_TRIM_THRESHOLD_": "131072"}])
def test_freed_memory_is_used_again_without_faulting_its_pages_in(env):
    # A trial's process keeps what it frees for its next steps (glibc hands it back by
    # default: every step faults its pages in again); a user's own malloc setting stays.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    tuned, faults = out[0] == "True", int(out[1])
    assert tuned == (not env.get("MALLOC_TRIM_THRESHOLD_"))
    assert (faults == 0) if tuned else (faults > 100)
