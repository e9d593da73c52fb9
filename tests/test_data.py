"""Datasets: real data offline, per-class splits with a fixed seed, uint8 tensors, clear errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sweeper import data
from sweeper.errors import UserError


def _indices_disjoint(a: data.Split, b: data.Split) -> bool:
    """No image appears in both splits (compared by content)."""
    seen = {bytes(x.numpy()) for x in a.images}
    return not any(bytes(x.numpy()) in seen for x in b.images)


def test_fashion_mnist_offline_from_debian_package(make_cfg):
    """The default target: Fashion-MNIST classes 5-9, 100 train and 100 val per class."""
    cfg = make_cfg(tiny=False)
    d = data.load(cfg.dataset)
    assert d.classes == [5, 6, 7, 8, 9]
    assert len(d.train) == 500 and len(d.val) == 500 and len(d.test) == 5000
    assert d.train.images.dtype == torch.uint8
    assert d.train.images.shape[1:] == (1, 32, 32)
    assert torch.equal(torch.bincount(d.train.labels), torch.full((5,), 100))
    assert _indices_disjoint(d.train, d.val)
    again = data.load(cfg.dataset)  # the split seed fixes the split
    assert torch.equal(again.train.images, d.train.images)
    other = data.load(make_cfg("dataset.split_seed=1", tiny=False).dataset)
    assert not torch.equal(other.train.images, d.train.images)


def test_normalize_makes_three_channels_on_the_batch():
    norm = data.Normalize([0.5], [0.25])
    x = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    out = norm(x)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, 2.0))


def test_digits_from_scikit_learn(make_cfg):
    d = data.load(make_cfg("dataset=digits").dataset)
    assert len(d.classes) == 10
    assert (len(d.train), len(d.val), len(d.test)) == (500, 300, 500)
    assert _indices_disjoint(d.train, d.test) and _indices_disjoint(d.val, d.test)
    assert d.train.images.shape[1:] == (1, 32, 32)


def _folder(root, counts: dict[str, int]):
    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            colour = (40 * k, 10 * i, 200 - 40 * k)
            Image.new("RGB", (40, 30), colour).save(root / name / f"{i}.png")
    return root


def test_image_folder(make_cfg, tmp_path):
    root = _folder(tmp_path / "imgs", {"cat": 6, "dog": 5})
    cfg = make_cfg("dataset=image_folder", f"dataset.root={root}", "dataset.train_per_class=3",
                   "dataset.val_per_class=1", "dataset.image_size=16")
    d = data.load(cfg.dataset)
    assert (len(d.train), len(d.val), len(d.test)) == (6, 2, 3)
    assert d.train.images.shape[1:] == (3, 16, 16)


def test_class_subset_and_too_few_images(make_cfg, tmp_path):
    root = _folder(tmp_path / "imgs", {"a": 4, "b": 4, "c": 2})
    base = ["dataset=image_folder", f"dataset.root={root}", "dataset.train_per_class=2",
            "dataset.val_per_class=1"]
    d = data.load(make_cfg(*base, "dataset.classes=[0,1]").dataset)
    assert d.classes == [0, 1] and len(d.train) == 4
    with pytest.raises(UserError, match="fewer images"):
        data.load(make_cfg(*base).dataset)


def test_image_folder_errors(make_cfg, tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        data.load(make_cfg("dataset=image_folder", f"dataset.root={tmp_path}/missing").dataset)
    root = _folder(tmp_path / "imgs", {"a": 3})
    (root / "empty").mkdir()
    with pytest.raises(UserError, match="at least one image"):
        data.load(make_cfg("dataset=image_folder", f"dataset.root={root}").dataset)


def test_fashion_mnist_missing_everywhere_names_both_ways(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    cfg = make_cfg(f"dataset.debian_dir={tmp_path}/none", f"dataset.root={tmp_path}/data",
                   tiny=False)
    with pytest.raises(UserError) as err:
        data.load(cfg.dataset)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "internet" in str(err.value)
