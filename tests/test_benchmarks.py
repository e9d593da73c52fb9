"""The benchmarks run: the GPU benchmark's tiny mode goes through every part of it on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


def test_the_gpu_benchmark_runs_end_to_end_in_its_tiny_mode(tmp_path):
    env = {**os.environ, "SWEEPER_OUTPUTS": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_speed", "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("device: ")
    rows = {line.split()[0]: line for line in lines if line.split()[:1] in (["9"], ["2"], ["0"])}
    assert set(rows) == {"9", "2", "0"}  # ResNet-18: all, layer4, head only
    assert "all" in rows["9"] and "layer4.0.." in rows["2"] and "head" in rows["0"]
    for part in ("study wall time: naive", "study bound:", "study ours' wall time:",
                 "full fine-tuning through the whole data path",
                 "layer4 trainable (unfrozen 2)", "head only:", "whole study:", "accuracy: ours+bn"):
        assert any(part in line for line in lines), part
    assert not list(tmp_path.glob("gpu_speed-*/cache-*"))  # GBs at full size: removed


def test_the_gpu_benchmark_runs_its_study_alone(tmp_path):
    env = {**os.environ, "SWEEPER_OUTPUTS": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_speed", "--tiny", "--no-table",
                           "--study-trials", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert not any(line.split()[:1] in (["9"], ["2"], ["0"]) for line in lines)  # no table rows
    assert not any("head only:" in line for line in lines)
    assert any("study: 1 trials" in line for line in lines)
    assert any("whole study:" in line for line in lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the whole benchmark")
def test_the_gpu_benchmark_stops_at_once_without_a_gpu_and_says_what_to_do(tmp_path):
    env = {**os.environ, "SWEEPER_OUTPUTS": str(tmp_path / "outputs")}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_speed"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "No CUDA device here" in done.stderr and "--tiny" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "outputs").exists()  # nothing pretrained, nothing left behind
