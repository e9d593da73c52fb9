"""Datasets as whole uint8 tensors: decoded once, split per class with a fixed seed.

Each dataset config has a ``kind`` (where its images come from: :data:`KINDS`), a ``name``
(how studies, runs and MLflow params label it), an image size, its normalisation, the classes
to keep and how many images per class go to train / val / test; any other key is an error
that names it. Images are decoded and resized once, into ``uint8`` tensors of shape
(N, C, S, S); conversion to float, grey to 3 channels and normalisation happen batched on the
training device (:class:`Normalize`), so the training loop does no per-sample Python or PIL
work.

Image files (kinds ``image_folder``, ``split_folder``, ``csv``) that cannot be read are
skipped and counted in the log (``dataset.on_bad_image=skip``, the default) or stop the run
with the file's name (``fail``).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from sweeper.errors import UserError

log = logging.getLogger(__name__)

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass
class Pool:
    """Labelled images to draw a split from; ``load`` decodes the images at given indices and
    says which it could read (None: all of them)."""

    labels: torch.Tensor  # int64 (N,)
    load: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    skipped: list[str] = field(default_factory=list)  # unreadable files met so far (skip mode)


def _tensor_pool(images: torch.Tensor, labels) -> Pool:
    images = images if images.ndim == 4 else images.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    return Pool(torch.as_tensor(labels, dtype=torch.int64), lambda idx: (images[idx], None))


@dataclass
class Sources:
    """Where a dataset's splits are drawn from: ``train`` alone (val, and test when ``test``
    is None, drawn from it after train), or a pool per split (a folder already split)."""

    train: Pool
    test: Pool | None = None
    val: Pool | None = None


ON_BAD_IMAGE = ("skip", "fail")


def _file_pool(paths: list[str], labels: list[int], cfg: DictConfig) -> Pool:
    """Image files, decoded (RGB), resized and centre-cropped to ``image_size`` when drawn."""
    on_bad = str(cfg.get("on_bad_image", "skip"))
    if on_bad not in ON_BAD_IMAGE:
        raise UserError(f"dataset.on_bad_image={on_bad}: use skip (unreadable images are skipped "
                        "and counted in the log) or fail (the first one stops the run).")
    size = int(cfg.image_size)
    pool = Pool(torch.tensor(labels, dtype=torch.int64), lambda idx: (torch.empty(0), None))

    def load(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, kept = [], []
        for i in idx.tolist():
            try:
                with Image.open(paths[i]) as f:
                    img = TF.pil_to_tensor(f.convert("RGB"))  # decoded once, here
            except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file
                if on_bad == "fail":
                    raise UserError(f"Cannot read image {paths[i]} ({type(e).__name__}: {e}). "
                                    "Fix or remove it, or set dataset.on_bad_image=skip to "
                                    "skip unreadable images.") from None
                pool.skipped.append(f"{paths[i]} ({type(e).__name__}: {e})")
                kept.append(False)
                continue
            out.append(TF.center_crop(TF.resize(img, size, antialias=True), [size, size]))
            kept.append(True)
        images = torch.stack(out) if out else torch.empty(0, 3, size, size, dtype=torch.uint8)
        return images, torch.tensor(kept, dtype=torch.bool)

    pool.load = load
    return pool


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, S, S)
    labels: torch.Tensor  # int64 (N,), 0..num_classes-1

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    classes: list[int]  # original class ids, in the order of the new labels
    normalize: Normalize
    skipped: list[str] = field(default_factory=list)  # unreadable image files left out, why


class Normalize(nn.Module):
    """uint8 (N, C, H, W) -> float normalised (N, 3, H, W), on whatever device the batch is."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        # As given, on the host whatever device the buffers move to: a cache key hashes these
        # (reading the buffers back from a GPU waits for all the work queued before it).
        self.stats = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
        for name, stat in zip(("mean", "std"), self.stats, strict=True):
            self.register_buffer(name, torch.tensor(stat, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


class Augment(nn.Module):
    """Random train transform on uint8 batches (N, C, S, S), batched on their device.

    ``crop_padding``: zero-pad by that many pixels and take a random S x S crop per image;
    ``hflip``: flip each image left-right with probability 1/2. Draws from torch's RNG on the
    batch's device (seeded by the trial). A random transform makes the frozen prefix's train
    outputs change every epoch, so they cannot be cached (:mod:`sweeper.feeds`).
    """

    def __init__(self, crop_padding: int = 0, hflip: bool = False) -> None:
        super().__init__()
        self.crop_padding = int(crop_padding)
        self.hflip = bool(hflip)

    @property
    def random(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def describe(self) -> str:
        return f"augment.crop_padding={self.crop_padding}, augment.hflip={str(self.hflip).lower()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.crop_padding:
            p = self.crop_padding
            padded = nn.functional.pad(x, (p, p, p, p))
            dy, dx = (torch.randint(0, 2 * p + 1, (n, 1), device=x.device) for _ in range(2))
            rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
            cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
            x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                       torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
        if self.hflip:
            flip = torch.rand(n, device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


def augment(cfg: DictConfig | None) -> Augment | None:
    """The ``augment/`` config as an :class:`Augment`, or None when it changes nothing."""
    if cfg is None:
        return None
    aug = Augment(cfg.get("crop_padding", 0), cfg.get("hflip", False))
    return aug if aug.random else None


# --- sources -------------------------------------------------------------------------------

def _fashion_mnist(cfg: DictConfig) -> Sources:
    root = Path(cfg.root)
    raw = root / "FashionMNIST" / "raw"
    debian = Path(cfg.debian_dir)
    have = lambda d, suffix="": all((d / (f + suffix)).exists() for f in FASHION_MNIST_FILES)  # noqa: E731
    if not have(raw) and have(debian, ".gz"):
        # Debian's dataset-fashion-mnist holds the original IDX files: unpack them where
        # torchvision's FashionMNIST looks, once (under a lock: trials may run in parallel).
        raw.mkdir(parents=True, exist_ok=True)
        with FileLock(str(raw / ".unpack.lock")):
            for f in FASHION_MNIST_FILES:
                if not (raw / f).exists():
                    tmp = raw / f"{f}.tmp{os.getpid()}"
                    with gzip.open(debian / f"{f}.gz", "rb") as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.replace(tmp, raw / f)
        log.info("Fashion-MNIST from Debian's dataset-fashion-mnist (%s)", debian)
    download = bool(cfg.download) and not have(raw)
    try:
        train = torchvision.datasets.FashionMNIST(str(root), train=True, download=download)
        test = torchvision.datasets.FashionMNIST(str(root), train=False, download=download)
    except (RuntimeError, OSError) as e:
        raise UserError(
            f"Fashion-MNIST is not available offline and could not be downloaded ({e}).\n"
            "Either install Debian's package:  apt-get install dataset-fashion-mnist\n"
            f"(it puts the IDX files in {debian}), or run once with internet access so that "
            f"torchvision downloads it to {raw}."
        ) from None
    return Sources(_tensor_pool(train.data, train.targets), _tensor_pool(test.data, test.targets))


def _cifar(cls) -> Callable[[DictConfig], Sources]:
    def load(cfg: DictConfig) -> Sources:
        try:
            train = cls(str(cfg.root), train=True, download=bool(cfg.download))
            test = cls(str(cfg.root), train=False, download=bool(cfg.download))
        except (RuntimeError, OSError) as e:
            raise UserError(
                f"{cls.__name__} is not in {cfg.root} and could not be downloaded ({e}).\n"
                f"Run once with internet access, or put torchvision's {cls.__name__} archive "
                f"({cls.filename}) in {cfg.root}."
            ) from None
        as_tensor = lambda d: torch.from_numpy(d).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        return Sources(_tensor_pool(as_tensor(train.data), train.targets),
                       _tensor_pool(as_tensor(test.data), test.targets))
    return load


def _digits(cfg: DictConfig) -> Sources:
    from sklearn.datasets import load_digits

    digits = load_digits()  # bundled with scikit-learn: 1797 8x8 images, values 0..16
    images = torch.from_numpy(np.round(digits.images * (255 / 16)).astype(np.uint8))
    return Sources(_tensor_pool(images, digits.target))


# The kinds whose images are files under dataset.root: what the folder holds, and an example.
FOLDER_KINDS: dict[str, tuple[str, str]] = {
    "image_folder": ("a folder with one subfolder of images per class",
                     "dataset=image_folder dataset.root=/path/to/images"),
    "split_folder": ("a folder already split into train/, val/ (and test/), each with one "
                     "subfolder of images per class",
                     "dataset=split_folder dataset.root=/path/to/images"),
}


def folder_root(cfg: DictConfig, prefix: str = "") -> Path:
    """The ``root`` of a dataset of a kind in :data:`FOLDER_KINDS`, which must be a folder
    (checked before any work by :mod:`sweeper.validate`, and again when it is read)."""
    layout, example = FOLDER_KINDS[kind_of(cfg)]
    root = "???" if OmegaConf.is_missing(cfg, "root") else cfg.root
    if root == "???" or root is None or not Path(root).is_dir():
        raise UserError(f"{prefix}dataset.root={root} is not a folder. Point it at {layout}:  "
                        f"{example}")
    return Path(root)


def _scan(folder: Path, class_names: list[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """The class subfolders of ``folder`` (or the given ones, by name) and their image files."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    names = class_names if class_names is not None else find_classes(str(folder))[0]
    present = {d.name for d in folder.iterdir() if d.is_dir()}
    to_index = {c: k for k, c in enumerate(names) if c in present}
    samples = make_dataset(str(folder), to_index, extensions=IMG_EXTENSIONS, allow_empty=True)
    empty = sorted(set(to_index) - {names[y] for _, y in samples})
    if empty and class_names is None:
        raise UserError(f"Found no image files in class folders {', '.join(empty)} of {folder}. "
                        "Every class subfolder needs at least one image (.jpg, .png, ...): remove "
                        "the empty ones or add images.")
    return names, [p for p, _ in samples], [y for _, y in samples]


def _image_folder(cfg: DictConfig) -> Sources:
    root = folder_root(cfg)
    _, paths, labels = _scan(root)
    return Sources(_file_pool(paths, labels, cfg))


def _split_folder(cfg: DictConfig) -> Sources:
    root = folder_root(cfg)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise UserError(f"dataset.root={root} needs train/ and val/ subfolders (test/ is "
                        "optional), each with one subfolder of images per class.")
    names, paths, labels = _scan(root / "train")
    pools = {"train": _file_pool(paths, labels, cfg)}
    for split in ("val", "test"):
        if (root / split).is_dir():
            extra = sorted(d.name for d in (root / split).iterdir() if d.is_dir()
                           and d.name not in names)
            if extra:
                raise UserError(f"{root / split} has class folders that train/ does not: "
                                f"{', '.join(extra)}. The classes are train/'s subfolders.")
            _, paths, labels = _scan(root / split, names)
            pools[split] = _file_pool(paths, labels, cfg)
    if "test" not in pools:
        log.info("%s: no test/ folder, so the test split is val/ again (test_acc = accuracy on "
                 "val/).", root)
        pools["test"] = pools["val"]
    return Sources(pools["train"], pools["test"], pools["val"])


def _csv(cfg: DictConfig) -> Sources:
    import pandas as pd

    file = "???" if OmegaConf.is_missing(cfg, "file") else cfg.file
    if file == "???" or file is None or not Path(file).is_file():
        raise UserError(f"dataset.file={file} is not a file. Point it at a CSV file with a column "
                        f"of image paths ({cfg.path_column}) and one of labels ({cfg.label_column}):"
                        "  dataset=csv dataset.file=/path/to/labels.csv")
    root = Path(cfg.root) if cfg.get("root") is not None else Path(file).parent
    try:
        table = pd.read_csv(file, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - any unreadable CSV is the same user error
        raise UserError(f"dataset.file={file} is not a readable CSV file ({e}).") from None
    columns = [cfg.path_column, cfg.label_column] + ([cfg.split_column] if cfg.split_column else [])
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise UserError(f"dataset.file={file} has no column {absent[0]} (its columns: "
                        f"{', '.join(table.columns)}); set dataset.path_column, "
                        "dataset.label_column or dataset.split_column.")
    labels = table[cfg.label_column].str.strip()
    names = sorted(set(labels), key=lambda c: (not c.lstrip("-").isdigit(),
                                               int(c) if c.lstrip("-").isdigit() else 0, c))
    index = {c: k for k, c in enumerate(names)}
    paths = [str(root / p.strip()) for p in table[cfg.path_column]]
    ys = [index[c] for c in labels]
    if not cfg.split_column:
        return Sources(_file_pool(paths, ys, cfg))
    splits = table[cfg.split_column].str.strip().str.lower()
    unknown = sorted(set(splits) - {"train", "val", "test"})
    if unknown or "train" not in set(splits) or "val" not in set(splits):
        raise UserError(f"Column {cfg.split_column} of {file} must say train, val or test for each "
                        f"image, with some train and val images (found: {', '.join(sorted(set(splits)))}).")
    pools = {s: _file_pool([p for p, t in zip(paths, splits, strict=True) if t == s],
                           [y for y, t in zip(ys, splits, strict=True) if t == s], cfg)
             for s in ("train", "val", "test") if s in set(splits)}
    if "test" not in pools:
        log.info("%s: no test rows, so the test split is val again.", file)
        pools["test"] = pools["val"]
    return Sources(pools["train"], pools["test"], pools["val"])


def _fake(cfg: DictConfig) -> Sources:
    size = int(cfg.image_size)
    fake = torchvision.datasets.FakeData(
        size=int(cfg.size), image_size=(3, size, size), num_classes=int(cfg.num_classes),
        random_offset=int(cfg.split_seed),
    )
    images, labels = zip(*((TF.pil_to_tensor(img), int(y)) for img, y in fake), strict=True)
    return Sources(_tensor_pool(torch.stack(images), labels))


_COMMON = ("name", "kind", "image_size", "mean", "std", "classes", "train_per_class",
           "val_per_class", "test_per_class", "split_seed")


@dataclass(frozen=True)
class Kind:
    """Where a kind of dataset gets its images, and the settings it reads besides the common
    ones (``name``, ``kind``, ``image_size``, ``mean``, ``std``, ``classes``, ``*_per_class``,
    ``split_seed``)."""

    sources: Callable[[DictConfig], Sources]
    settings: tuple[str, ...] = ()
    # Settings that say where a copy of the data is kept, not which data it is (left out of
    # what keys a checkpoint pretrained on it).
    location: tuple[str, ...] = ()
    # What a packaged dataset holds, known without reading it (split sizes are checked
    # against it before any work, by sweeper.validate); None for the user's own images.
    classes: int | None = None
    per_class: int | None = None  # training images of its smallest class
    test_per_class: int | None = None  # its own test set's images per class; None: drawn
    # Its sources are decoded whole into tensors and depend on its own settings only (not on
    # the split's seed, classes or sizes): a process keeps them for the next split.
    decoded: bool = False


_FASHION_MNIST = dict(classes=10, per_class=6000, test_per_class=1000)


KINDS: dict[str, Kind] = {
    "fashion_mnist": Kind(_fashion_mnist, ("root", "debian_dir", "download"),
                          ("root", "debian_dir", "download"), **_FASHION_MNIST, decoded=True),
    "cifar10": Kind(_cifar(torchvision.datasets.CIFAR10), ("root", "download"), ("root", "download"),
                    classes=10, per_class=5000, test_per_class=1000, decoded=True),
    "cifar100": Kind(_cifar(torchvision.datasets.CIFAR100), ("root", "download"),
                     ("root", "download"), classes=100, per_class=500, test_per_class=100,
                     decoded=True),
    "digits": Kind(_digits, classes=10, per_class=174, decoded=True),  # 174..183 per class
    "image_folder": Kind(_image_folder, ("root", "on_bad_image")),
    "split_folder": Kind(_split_folder, ("root", "on_bad_image")),
    "csv": Kind(_csv, ("file", "root", "path_column", "label_column", "split_column",
                       "on_bad_image")),
    "fake": Kind(_fake, ("size", "num_classes")),
}


def kind_of(cfg: DictConfig) -> str:
    """The dataset's kind (configs logged before kinds existed named it in ``name``)."""
    return str(cfg.get("kind") or cfg.name)


def check(cfg: DictConfig) -> Kind:
    """The dataset config's kind, its keys checked: an unknown key is named, never ignored."""
    kind = kind_of(cfg)
    if kind not in KINDS:
        raise UserError(f"dataset.kind={kind} is not a kind of dataset; known: "
                        f"{', '.join(KINDS)}.")
    settings = (*_COMMON, *KINDS[kind].settings)
    unknown = [k for k in cfg if k not in settings]
    if unknown:
        raise UserError(f"dataset.{unknown[0]} is not a setting of a {kind} dataset (its "
                        f"settings: {', '.join(settings)}); nothing would read it.")
    return KINDS[kind]


# --- splits --------------------------------------------------------------------------------

def _per_class(labels: torch.Tensor, classes: list[int], gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=gen)]
            for c in classes]


def _take(pool: Pool, picks: list[torch.Tensor], size: int) -> Split:
    idx = torch.cat(picks)
    labels = torch.cat([torch.full((len(p),), k, dtype=torch.int64) for k, p in enumerate(picks)])
    images, kept = pool.load(idx)
    if kept is not None:  # unreadable files skipped
        labels = labels[kept]
    if images.shape[-2:] != (size, size):
        images = TF.resize(images, [size, size], antialias=True)
    return Split(images.contiguous(), labels)


def _at_most(picks: list[torch.Tensor], count) -> list[torch.Tensor]:
    return picks if count is None else [p[: int(count)] for p in picks]


# Datasets loaded in this process, by their resolved config, the last used last: a study's
# trials use a few in turn (its repeats move between splits, split_seed). Kept while their
# images (counted per dataset, test included) take at most _KEEP_BYTES, and at most _KEEP
# of them; the last one used is always kept.
_LOADED: dict[str, Data] = {}
_KEEP, _KEEP_BYTES = 16, 512 * 2**20
# The sources of a decoded kind (Kind.decoded) and the test splits drawn from them, by what
# decides them: a study's repeats on other splits (split_seed) draw from the same images, and
# are tested on the same ones. One source is kept.
_SOURCES: dict[str, Sources] = {}
_TESTS: dict[str, Split] = {}


def load(cfg: DictConfig) -> Data:
    """Load the dataset described by ``cfg`` (a ``dataset/`` config) as train/val/test splits.

    Train and val are drawn per class from the source's training set with ``split_seed``;
    test is the source's own test set, the same whatever ``split_seed`` (or, for sources without
    one, drawn after train and val). ``*_per_class: null`` means all remaining images of that
    class. A folder already split (``split_folder``, a CSV with a split column) keeps its splits:
    ``*_per_class`` then takes at most that many images per class from each.

    A process decodes a dataset once: the same config again gets the same tensors (never
    change them in place).
    """
    kind = check(cfg)
    key = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str)
    data = _LOADED.pop(key, None)
    if data is None:
        data = _load(cfg, kind)
    _LOADED[key] = data
    while len(_LOADED) > 1 and (len(_LOADED) > _KEEP
                                or sum(map(_nbytes, _LOADED.values())) > _KEEP_BYTES):
        del _LOADED[next(iter(_LOADED))]
    return replace(data)


def _nbytes(data: Data) -> int:
    return sum(s.images.nbytes for s in (data.train, data.val, data.test))


def _sources(cfg: DictConfig, kind: Kind) -> tuple[Sources, str | None]:
    """The dataset's sources, and the key they are kept under in this process (None: not
    kept, they are read again for every split)."""
    if not kind.decoded:
        return kind.sources(cfg), None
    key = json.dumps([kind_of(cfg), *(OmegaConf.to_container(cfg, resolve=True).get(k)
                                      for k in kind.settings)], default=str)
    if key not in _SOURCES:
        src = kind.sources(cfg)
        _SOURCES.clear()
        _TESTS.clear()
        _SOURCES[key] = src
    return _SOURCES[key], key


def _load(cfg: DictConfig, kind: Kind) -> Data:
    src, kept = _sources(cfg, kind)
    present = sorted(set(src.train.labels.tolist()))
    classes = list(cfg.classes) if cfg.classes is not None else present
    if len(classes) < 2:
        raise UserError(f"{cfg.name}: found {len(classes)} class ({', '.join(map(str, classes)) or 'none'}"
                        f"); a classifier needs at least two. Give each class its own folder "
                        "(or label), or name two or more in dataset.classes.")
    missing = [c for c in classes if c not in present]
    if missing:
        raise UserError(f"dataset.classes names classes {missing} that {cfg.name} does not have "
                        f"(it has {present[0]}..{present[-1]}).")
    gen = torch.Generator().manual_seed(int(cfg.split_seed))
    picks = _per_class(src.train.labels, classes, gen)
    chunks: list[tuple[Pool, list[torch.Tensor]]] = []
    if src.val is None:
        counts = [cfg.train_per_class, cfg.val_per_class]
        if src.test is None:
            counts.append(cfg.test_per_class)
        need = sum(int(c) for c in counts if c is not None)
        short = {c: len(p) for c, p in zip(classes, picks, strict=True) if len(p) < need}
        if short:
            raise UserError(
                f"{cfg.name}: classes {short} have fewer images than the {need} per class that "
                "train_per_class + val_per_class (+ test_per_class) ask for. Lower those counts."
            )
        start = [0] * len(picks)
        for count in counts:
            chunk = []
            for k, p in enumerate(picks):
                end = len(p) if count is None else start[k] + int(count)
                chunk.append(p[start[k]:end])
                start[k] = end
            chunks.append((src.train, chunk))
    else:
        chunks.append((src.train, _at_most(picks, cfg.train_per_class)))
        chunks.append((src.val, _at_most(_per_class(src.val.labels, classes, gen),
                                         cfg.val_per_class)))
    if src.test is not None and src.test is src.val:  # no test folder or rows: val again
        chunks.append((src.val, _at_most(chunks[-1][1], cfg.test_per_class)))
    elif src.test is not None:
        # The source's own test set does not move with split_seed (that splits train from val):
        # every split is tested on the same images, and their frozen-prefix outputs are cached
        # once.
        fixed = torch.Generator().manual_seed(0)
        chunks.append((src.test, _at_most(_per_class(src.test.labels, classes, fixed),
                                          cfg.test_per_class)))
    size = int(cfg.image_size)
    train, val = (_take(pool, chunk, size) for pool, chunk in chunks[:2])
    test = None
    if kept is not None and chunks[2][0] is src.test:  # the source's own test set: fixed
        test_key = json.dumps([kept, classes, cfg.test_per_class, size], default=str)
        test = _TESTS.get(test_key)
        if test is None:
            test = _TESTS[test_key] = _take(*chunks[2], size)
    if test is None:
        test = _take(*chunks[2], size)
    skipped = sorted({f for pool in (src.train, src.val, src.test) if pool for f in pool.skipped})
    if skipped:
        log.warning("%s: skipped %d unreadable images (dataset.on_bad_image=skip): %s%s", cfg.name,
                    len(skipped), "; ".join(skipped[:3]), " ..." if len(skipped) > 3 else "")
    if min(len(train), len(val), len(test)) == 0:
        raise UserError(f"{cfg.name}: a split is empty (train {len(train)}, val {len(val)}, "
                        f"test {len(test)}); raise the *_per_class counts.")
    return Data(train, val, test, classes, Normalize(cfg.mean, cfg.std), skipped)
