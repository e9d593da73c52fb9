"""Trained parts of trials, kept on disk so that a model can be rebuilt without training it again.

A trial's *trained part* is what training changed in its :class:`~sweeper.model.FreezeNet`:
the trainable units and the head, plus the buffers of the frozen units (BatchNorm statistics,
which ``freeze.bn_stats=target`` re-estimates). The frozen units' parameters are not kept:
they are the pretrained weights the trial's config names, and the hashes of those units
(:func:`sweeper.feeds.unit_digest`, the cache's own) are kept to check that a rebuilt model
has the same ones. Each entry also holds the trial's resolved config, so it is enough, with
the pretrained weights, to rebuild the trained model.

A study keeps one entry per trial in ``<paths.states>/<study name>/<MLflow run id>.safetensors``
(the trained part as tensors, the rest as the file's metadata; entries an earlier version
wrote with ``torch.save`` as ``<run id>.pt`` are still read); at its end it evaluates the test
set of the trials its report needs from their entries and prunes the rest
(:mod:`sweeper.study`). Using a store::

    store = StateStore.for_study(cfg.paths, "freeze-resnet18-fashion_mnist")
    store.save(run_id, model, cfg)       # after training
    store.run_ids()                      # what is kept
    cfg = store.config(run_id)           # the trial's resolved config
    model, _ = sweeper.trial.build_model(cfg, num_classes, device)   # as the trial built it
    store.load(run_id, model)            # now it predicts as the trained model did
    store.prune(keep=[run_id])           # delete every other entry
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from sweeper import background as background_writes
from sweeper.feeds import unit_digest
from sweeper.model import FreezeNet

log = logging.getLogger(__name__)

# Entry files. Format 2 is a safetensors file: its writer holds the GIL only briefly (a
# trial's entry is written in the background while the next trial starts; torch.save's
# pickling held it for about 13 ms of every 47 MB entry), and its metadata (the config) is read
# without the tensors. Format 1 (torch.save, ``.pt``) entries are still read.
FORMAT = 2
SUFFIX = ".safetensors"
FORMATS = {SUFFIX: FORMAT, ".pt": 1}  # every suffix read, the written one first


class StateMismatch(ValueError):
    """A kept state does not fit the model it is loaded into (other depth, weights or layers)."""


def trained_part(model: FreezeNet) -> dict[str, torch.Tensor]:
    """``model``'s state without the frozen units' parameters (on the CPU)."""
    frozen = {f"units.{i}.{name}" for i, unit in enumerate(model.frozen_units())
              for name, _ in unit.named_parameters()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen}


def _digests(model: FreezeNet) -> list[str]:
    """What identifies the frozen units' weights and statistics (the cache's keys use it too)."""
    return [unit_digest(u) for u in model.frozen_units()]


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as a safetensors file takes it: contiguous tensors that share no memory (a
    model's tied weights are copied; a CPU model's other tensors are stored as they are)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in state.items():
        t = t.contiguous()
        span = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and span in seen:
            t = t.clone()
        seen.add(span)
        out[k] = t
    return out


class StateStore:
    """A folder of kept trained parts, one file per key (a trial's MLflow run id)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    @classmethod
    def for_study(cls, paths: DictConfig, study_name: str) -> StateStore:
        """The store of study ``study_name``: ``<paths.states>/<study_name>/``."""
        return cls(Path(str(paths.states)) / study_name)

    def path(self, key: str) -> Path:
        """The entry's file: the one on disk (this version's, else an earlier format's), or
        where :meth:`save` writes it."""
        files = self._files(key)
        return files[0] if files else self.folder / f"{key}{SUFFIX}"

    def _files(self, key: str) -> list[Path]:
        """The entry files of ``key`` on disk, this version's first."""
        return [p for p in (self.folder / f"{key}{suffix}" for suffix in FORMATS) if p.is_file()]

    def _all_files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return [p for suffix in FORMATS for p in self.folder.glob(f"*{suffix}")]

    def save(self, key: str, model: FreezeNet, config: DictConfig | str,
             frozen_digests: Sequence[str] | None = None, background: bool = False) -> Path:
        """Keep ``model``'s trained part and the resolved ``config`` it was trained with (or
        that config's resolved YAML, :func:`sweeper.config.config_yaml`).

        ``frozen_digests``: the :func:`~sweeper.feeds.unit_digest` of its frozen units, when
        already computed (the cache does); :meth:`load` checks them. Written to a temporary
        file and renamed into place, so a reader never sees half an entry.

        With ``background``, the file is written by the process's state writer thread
        (:data:`sweeper.background.STATES`) and this returns at once: the model must not change
        until then (a trial drops it). This store's readers in this process (:meth:`run_ids`,
        :meth:`config`, :meth:`load`, :meth:`prune`) wait for pending writes first; another
        process must wait for :meth:`written` before it relies on the entry.
        """
        if frozen_digests is None:
            frozen_digests = _digests(model)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": str(FORMAT), "unfrozen": str(model.unfrozen),
                "num_units": str(model.num_units), "frozen_digests": json.dumps(list(frozen_digests)),
                "config": config if isinstance(config, str) else OmegaConf.to_yaml(config,
                                                                                   resolve=True)}
        state = _unshared(trained_part(model))
        path = self.folder / f"{key}{SUFFIX}"

        def write() -> None:
            tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
            try:
                save_file(state, tmp, metadata=meta)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            for older in self._files(key)[1:]:  # an earlier version's entry of the same key
                older.unlink(missing_ok=True)

        if not background:
            write()
            return path

        def write_or_warn() -> None:
            try:
                write()
            except Exception as e:  # noqa: BLE001 - nobody waits to hear it: said here
                log.warning("the trained part of %s was not kept in %s (%s: %s); its test "
                            "accuracy cannot be measured later", key, self.folder,
                            type(e).__name__, e)

        background_writes.STATES.submit(write_or_warn)
        return path

    @staticmethod
    def written() -> None:
        """Wait until every entry this process saved in the background is on disk (a write
        that failed leaves no entry: a reader finds none, as if the trial had kept nothing)."""
        background_writes.STATES.drain()

    def _read(self, key: str, tensors: bool = True) -> dict[str, Any]:
        """The entry of ``key``: ``unfrozen``, ``num_units``, ``frozen_digests``, ``config``
        (YAML) and, with ``tensors``, ``state``."""
        self.written()
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no kept state {key} in {self.folder}")
        if FORMATS[path.suffix] == 1:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry.get("format") != 1:
                raise StateMismatch(f"{path} has format {entry.get('format')}, not 1")
            return entry
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != str(FORMAT):
                raise StateMismatch(f"{path} has format {meta.get('format')}, not {FORMAT}")
            entry: dict[str, Any] = {
                "unfrozen": int(meta["unfrozen"]), "num_units": int(meta["num_units"]),
                "frozen_digests": json.loads(meta["frozen_digests"]), "config": meta["config"]}
            if tensors:
                entry["state"] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        return entry

    def config(self, key: str) -> DictConfig:
        """The resolved config the kept trial was trained with."""
        return OmegaConf.create(self._read(key, tensors=False)["config"])

    def load(self, key: str, model: FreezeNet) -> None:
        """Load the kept trained part into ``model``, built as the trial built its own (for a
        kept config: :func:`sweeper.trial.build_model`).

        Raises :class:`StateMismatch` when the depth, the layers or the frozen units' weights
        differ from the trained model's.
        """
        entry = self._read(key)
        if (entry["num_units"], entry["unfrozen"]) != (model.num_units, model.unfrozen):
            raise StateMismatch(
                f"kept state {key} is for {entry['unfrozen']} of {entry['num_units']} units "
                f"unfrozen; the model has {model.unfrozen} of {model.num_units}")
        expected = trained_part(model).keys()
        state = entry["state"]
        if state.keys() != expected:
            missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
            raise StateMismatch(f"kept state {key} does not fit the model: missing "
                                f"{missing[:3]}, unexpected {extra[:3]}")
        model.load_state_dict(state, strict=False)
        if _digests(model) != entry["frozen_digests"]:
            raise StateMismatch(f"the frozen units' weights differ from those kept state {key} "
                                "was trained with (were the pretrained weights rebuilt?)")

    def run_ids(self) -> list[str]:
        """The keys of the kept entries, oldest first."""
        self.written()
        files = sorted(self._all_files(), key=lambda p: p.stat().st_mtime)
        return list(dict.fromkeys(p.stem for p in files))

    def nbytes(self) -> int:
        """The bytes the entries on disk hold now (without waiting for pending writes)."""
        total = 0
        for path in self._all_files():
            with contextlib.suppress(FileNotFoundError):  # pruned meanwhile
                total += path.stat().st_size
        return total

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Delete every entry whose key is not in ``keep``; returns the deleted keys."""
        keep = set(keep)
        gone = [key for key in self.run_ids() if key not in keep]
        for key in gone:
            for path in self._files(key):
                path.unlink(missing_ok=True)
        return gone
