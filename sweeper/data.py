"""Datasets as whole uint8 tensors: decoded once, split per class with a fixed seed.

Each dataset config names a source (``name``), an image size, its normalisation, the classes
to keep and how many images per class go to train / val / test. Images are decoded and
resized once, into ``uint8`` tensors of shape (N, C, S, S); conversion to float, grey to
3 channels and normalisation happen batched on the training device (:class:`Normalize`), so
the training loop does no per-sample Python or PIL work.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
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
    """Labelled images to draw a split from; ``load`` decodes the images at given indices."""

    labels: torch.Tensor  # int64 (N,)
    load: Callable[[torch.Tensor], torch.Tensor]  # indices -> uint8 (n, C, H, W)


def _tensor_pool(images: torch.Tensor, labels) -> Pool:
    images = images if images.ndim == 4 else images.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    return Pool(torch.as_tensor(labels, dtype=torch.int64), lambda idx: images[idx])


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


class Normalize(nn.Module):
    """uint8 (N, C, H, W) -> float normalised (N, 3, H, W), on whatever device the batch is."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

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

def _fashion_mnist(cfg: DictConfig) -> tuple[Pool, Pool]:
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
    return _tensor_pool(train.data, train.targets), _tensor_pool(test.data, test.targets)


def _cifar(cls) -> Callable[[DictConfig], tuple[Pool, Pool]]:
    def load(cfg: DictConfig) -> tuple[Pool, Pool]:
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
        return (_tensor_pool(as_tensor(train.data), train.targets),
                _tensor_pool(as_tensor(test.data), test.targets))
    return load


def _digits(cfg: DictConfig) -> tuple[Pool, None]:
    from sklearn.datasets import load_digits

    digits = load_digits()  # bundled with scikit-learn: 1797 8x8 images, values 0..16
    images = torch.from_numpy(np.round(digits.images * (255 / 16)).astype(np.uint8))
    return _tensor_pool(images, digits.target), None


def _image_folder(cfg: DictConfig) -> tuple[Pool, None]:
    root = "???" if OmegaConf.is_missing(cfg, "root") else cfg.root
    if root == "???" or root is None or not Path(root).is_dir():
        raise UserError(
            f"dataset.root={root} is not a folder. Point it at a folder with one subfolder "
            "of images per class:  dataset=image_folder dataset.root=/path/to/images"
        )
    try:
        folder = torchvision.datasets.ImageFolder(str(cfg.root))
    except FileNotFoundError as e:
        raise UserError(
            f"{e}.\nEvery class subfolder of {cfg.root} needs at least one image "
            "(.jpg, .png, ...): remove the empty ones or add images."
        ) from None
    size = int(cfg.image_size)

    def load(idx: torch.Tensor) -> torch.Tensor:
        out = []
        for i in idx.tolist():
            img = TF.pil_to_tensor(folder.loader(folder.samples[i][0]))  # RGB, decoded once
            out.append(TF.center_crop(TF.resize(img, size, antialias=True), [size, size]))
        return torch.stack(out)

    return Pool(torch.tensor(folder.targets), load), None


def _fake(cfg: DictConfig) -> tuple[Pool, None]:
    size = int(cfg.image_size)
    fake = torchvision.datasets.FakeData(
        size=int(cfg.size), image_size=(3, size, size), num_classes=int(cfg.num_classes),
        random_offset=int(cfg.split_seed),
    )
    images, labels = zip(*((TF.pil_to_tensor(img), int(y)) for img, y in fake), strict=True)
    return _tensor_pool(torch.stack(images), labels), None


SOURCES: dict[str, Callable[[DictConfig], tuple[Pool, Pool | None]]] = {
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar(torchvision.datasets.CIFAR10),
    "cifar100": _cifar(torchvision.datasets.CIFAR100),
    "digits": _digits,
    "image_folder": _image_folder,
    "fake": _fake,
}


# --- splits --------------------------------------------------------------------------------

def _per_class(labels: torch.Tensor, classes: list[int], gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=gen)]
            for c in classes]


def _take(pool: Pool, picks: list[torch.Tensor], size: int) -> Split:
    idx = torch.cat(picks)
    labels = torch.cat([torch.full((len(p),), k, dtype=torch.int64) for k, p in enumerate(picks)])
    images = pool.load(idx)
    if images.shape[-2:] != (size, size):
        images = TF.resize(images, [size, size], antialias=True)
    return Split(images.contiguous(), labels)


def load(cfg: DictConfig) -> Data:
    """Load the dataset described by ``cfg`` (a ``dataset/`` config) as train/val/test splits.

    Train and val are drawn per class from the source's training set with ``split_seed``;
    test is the source's own test set (or, for sources without one, drawn after them).
    ``*_per_class: null`` means all remaining images of that class.
    """
    if cfg.name not in SOURCES:
        raise UserError(f"Unknown dataset source {cfg.name!r}; known: {', '.join(SOURCES)}")
    pool, test_pool = SOURCES[cfg.name](cfg)
    present = sorted(set(pool.labels.tolist()))
    classes = list(cfg.classes) if cfg.classes is not None else present
    missing = [c for c in classes if c not in present]
    if missing:
        raise UserError(f"dataset.classes names classes {missing} that {cfg.name} does not have "
                        f"(it has {present[0]}..{present[-1]}).")
    gen = torch.Generator().manual_seed(int(cfg.split_seed))
    picks = _per_class(pool.labels, classes, gen)
    counts = [cfg.train_per_class, cfg.val_per_class]
    if test_pool is None:
        counts.append(cfg.test_per_class)
    need = sum(int(c) for c in counts if c is not None)
    short = {c: len(p) for c, p in zip(classes, picks, strict=True) if len(p) < need}
    if short:
        raise UserError(
            f"{cfg.name}: classes {short} have fewer images than the {need} per class that "
            "train_per_class + val_per_class (+ test_per_class) ask for. Lower those counts."
        )
    splits = []
    start = [0] * len(picks)
    for count in counts:
        chunk = []
        for k, p in enumerate(picks):
            end = len(p) if count is None else start[k] + int(count)
            chunk.append(p[start[k]:end])
            start[k] = end
        splits.append(_take(pool, chunk, int(cfg.image_size)))
    if test_pool is not None:
        test_picks = _per_class(test_pool.labels, classes, gen)
        if cfg.test_per_class is not None:
            test_picks = [p[: int(cfg.test_per_class)] for p in test_picks]
        splits.append(_take(test_pool, test_picks, int(cfg.image_size)))
    train, val, test = splits
    if min(len(train), len(val), len(test)) == 0:
        raise UserError(f"{cfg.name}: a split is empty (train {len(train)}, val {len(val)}, "
                        f"test {len(test)}); raise the *_per_class counts.")
    return Data(train, val, test, classes, Normalize(cfg.mean, cfg.std))
