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
    # the official test set does not move with the split: its cached features serve every split
    assert torch.equal(other.test.images, d.test.images)
    # and a process decodes the images once: another split draws from them, its test split
    # is the same tensors (a study's repeats on other splits do not read the files again)
    assert other.test.images.data_ptr() == d.test.images.data_ptr()
    # and repeats that move between splits draw each one once
    back = data.load(cfg.dataset)
    assert back.train.images.data_ptr() == d.train.images.data_ptr()


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


def _split_folder(root, train: dict[str, int], val: dict[str, int], test: dict[str, int] | None):
    for split, counts in (("train", train), ("val", val), ("test", test)):
        if counts is not None:
            _folder(root / split, counts)
    return root


def test_a_folder_already_split_keeps_its_splits(make_cfg, tmp_path):
    root = _split_folder(tmp_path / "imgs", {"cat": 5, "dog": 4}, {"cat": 2, "dog": 2},
                         {"cat": 3, "dog": 1})
    base = ["dataset=split_folder", f"dataset.root={root}", "dataset.image_size=16"]
    d = data.load(make_cfg(*base).dataset)
    assert (len(d.train), len(d.val), len(d.test)) == (9, 4, 4)
    assert d.classes == [0, 1] and torch.equal(torch.bincount(d.test.labels), torch.tensor([3, 1]))
    capped = data.load(make_cfg(*base, "dataset.train_per_class=2").dataset)
    assert len(capped.train) == 4  # at most 2 per class from train/
    # Without test/, the test split is val/ again.
    root = _split_folder(tmp_path / "nosplit", {"a": 3, "b": 3}, {"a": 1, "b": 2}, None)
    d = data.load(make_cfg("dataset=split_folder", f"dataset.root={root}").dataset)
    assert torch.equal(d.test.images, d.val.images)
    # A class that train/ does not have.
    root = _split_folder(tmp_path / "extra", {"a": 2}, {"a": 1, "b": 1}, None)
    with pytest.raises(UserError, match="class folders that train/ does not: b"):
        data.load(make_cfg("dataset=split_folder", f"dataset.root={root}").dataset)
    with pytest.raises(UserError, match="needs train/ and val/"):
        data.load(make_cfg("dataset=split_folder", f"dataset.root={tmp_path}/extra/val").dataset)


def _csv(tmp_path, rows: list[str], header: str = "path,label") -> str:
    images = _folder(tmp_path / "files", {"x": 6, "y": 6})
    (tmp_path / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return str(images)


def test_a_csv_file_of_paths_and_labels(make_cfg, tmp_path):
    rows = [f"x/{i}.png,cat" for i in range(6)] + [f"y/{i}.png,dog" for i in range(6)]
    root = _csv(tmp_path, rows)
    base = ["dataset=csv", f"dataset.file={tmp_path}/labels.csv", f"dataset.root={root}",
            "dataset.train_per_class=3", "dataset.val_per_class=2", "dataset.image_size=16"]
    d = data.load(make_cfg(*base).dataset)
    assert (len(d.train), len(d.val), len(d.test)) == (6, 4, 2)
    assert d.train.images.shape[1:] == (3, 16, 16)
    # Paths relative to the CSV file's folder when root is null.
    (tmp_path / "rel.csv").write_text("file,y,part\n" + "\n".join(
        f"files/{c}/{i}.png,{k},{'train' if i < 4 else 'val' if i < 5 else 'test'}"
        for k, c in enumerate("xy") for i in range(6)) + "\n")
    d = data.load(make_cfg("dataset=csv", f"dataset.file={tmp_path}/rel.csv",
                           "dataset.path_column=file", "dataset.label_column=y",
                           "dataset.split_column=part", "dataset.train_per_class=null").dataset)
    assert (len(d.train), len(d.val), len(d.test)) == (8, 2, 2)
    with pytest.raises(UserError, match="has no column path .its columns: file, y, part"):
        data.load(make_cfg("dataset=csv", f"dataset.file={tmp_path}/rel.csv").dataset)


def test_unreadable_images_are_skipped_and_counted_or_fail_with_the_name(make_cfg, tmp_path,
                                                                         caplog):
    rows = [f"x/{i}.png,cat" for i in range(6)] + [f"y/{i}.png,dog" for i in range(6)]
    root = _csv(tmp_path, [*rows, "x/missing.png,cat"])
    (tmp_path / "files" / "x" / "0.png").write_bytes(b"not an image")
    base = ["dataset=csv", f"dataset.file={tmp_path}/labels.csv", f"dataset.root={root}",
            "dataset.train_per_class=3", "dataset.val_per_class=2", "dataset.test_per_class=null"]
    d = data.load(make_cfg(*base).dataset)  # on_bad_image=skip by default
    assert len(d.train) + len(d.val) + len(d.test) == 13 - 2
    assert "skipped 2 unreadable images" in caplog.text
    assert "0.png" in caplog.text and "missing.png" in caplog.text
    with pytest.raises(UserError, match=r"Cannot read image .*(0|missing)\.png"):
        data.load(make_cfg(*base, "dataset.on_bad_image=fail").dataset)
    with pytest.raises(UserError, match="dataset.on_bad_image=ignore: use skip"):
        data.load(make_cfg(*base, "dataset.on_bad_image=ignore").dataset)
    # The same in an image folder.
    with pytest.raises(UserError, match=r"Cannot read image .*0\.png"):
        data.load(make_cfg("dataset=image_folder", f"dataset.root={root}",
                           "dataset.on_bad_image=fail", "dataset.train_per_class=4",
                           "dataset.val_per_class=1").dataset)


def test_a_dataset_key_nothing_reads_is_an_error_naming_it(make_cfg):
    with pytest.raises(UserError, match="dataset.train_per_clas is not a setting of a digits"):
        data.load(make_cfg("dataset=digits", "+dataset.train_per_clas=5").dataset)
    with pytest.raises(UserError, match="dataset.kind=mnist is not a kind of dataset"):
        data.load(make_cfg("dataset=digits", "dataset.kind=mnist").dataset)
    # Its own name labels it; the kind says where the images come from.
    d = data.load(make_cfg("dataset=digits", "dataset.name=mine").dataset)
    assert len(d.classes) == 10
