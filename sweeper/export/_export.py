"""Exporting a trial's model: which trial, where its weights come from, the files, the registry."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sweeper.errors import UserError
from sweeper.export._module import Served, fold_batchnorm, to_onnx, to_pt2
from sweeper.export._registry import log_and_register
from sweeper.export._source import Trained, trained
from sweeper.tracking import Run, Tag, Tracker, is_trial

log = logging.getLogger("sweeper.export")


def export_config(cfg: DictConfig, **overrides: Any) -> DictConfig:
    """``conf/export.yaml``'s settings for the project config ``cfg`` (its ``paths`` and
    ``tracking``), with ``overrides`` (None keeps the file's value): what a study's
    ``hydra.sweeper.register`` exports with, inside a Hydra app where composing is not possible."""
    from sweeper.config import CONF_DIR

    own = OmegaConf.load(CONF_DIR / "export.yaml")
    for key in ("defaults", "hydra"):
        own.pop(key)
    given = {k: v for k, v in overrides.items() if v is not None}
    return OmegaConf.merge(own, {"paths": cfg.paths, "tracking": cfg.tracking}, given)


@dataclass
class Exported:
    """What an export wrote and registered."""

    run_id: str  # the exported trial's MLflow run
    folder: Path
    pt2: Path
    onnx: Path | None
    test_acc: float  # of the exported file on the test split
    logged_test_acc: float | None  # the trial's, as MLflow recorded it
    source: str  # where the weights came from
    model_uri: str | None  # models:/NAME/VERSION when registered


def predict_batches(module: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """``module``'s predicted labels for uint8 ``images``, a batch at a time."""
    with torch.no_grad():
        return torch.cat([module(images[i:i + batch]).argmax(1)
                          for i in range(0, len(images), batch)])


def _recommended(cfg: DictConfig) -> tuple[str, str]:
    """The run id of the trial the study's report recommends, and the study's parent run id."""
    from sweeper.report import make_report

    report = make_report(cfg, cfg.get("study"), cfg.get("parent_run"), storage=cfg.get("storage"))
    if not report.recommended or not report.recommended.get("run_id"):
        raise UserError(f"Study {report.study} has no recommendation yet ({report.explanation}) "
                        "Finish it first (run its command again), or export one trial: "
                        "python -m sweeper.export run=RUN_ID")
    return str(report.recommended["run_id"]), report.parent_run_id


def export(cfg: DictConfig) -> Exported:
    """Export what ``cfg`` (``conf/export.yaml``) names: trial ``run``, else the recommended
    trial of ``parent_run``'s study, of study ``study``, or of the latest study."""
    if cfg.get("run"):
        return export_run(cfg, str(cfg.run))
    run_id, parent = _recommended(cfg)
    return export_run(cfg, run_id, recommended_by=parent)


def export_run(cfg: DictConfig, run_id: str, tracker: Tracker | None = None,
               recommended_by: str | None = None) -> Exported:
    """Export trial ``run_id``: its model file(s) under ``cfg.folder`` and, with
    ``cfg.register``, a registered MLflow model version. ``recommended_by``: the parent run of
    the study that recommends it, which gets tags pointing at the model."""
    from mlflow.exceptions import MlflowException

    tracker = tracker or Tracker(cfg.tracking)
    try:
        run = tracker.client.get_run(run_id)
    except MlflowException:
        raise UserError(f"No MLflow run {run_id} in {tracker.uri}: copy a trial's run id from "
                        "the MLflow UI or the study's report.") from None
    tags = run.data.tags
    study = tags.get(Tag.STUDY)
    if not is_trial(run):
        raise UserError(f"Run {run_id} ({run.info.run_name}) is not a trial: export a trial's "
                        "run, or a study with study=NAME / parent_run=RUN_ID.")
    got = trained(tracker, cfg.paths, study, run_id, bool(cfg.retrain))
    log.info("exporting run %s (%s): weights from %s", run_id, run.info.run_name, got.source)
    folder = Path(str(cfg.folder)) / (study or "runs") / (run.info.run_name or run_id)
    folder.mkdir(parents=True, exist_ok=True)
    served, example, test = _served(got, bool(cfg.fold_batchnorm))
    pt2 = folder / "model.pt2"
    program = to_pt2(served, example, pt2)
    correct = (predict_batches(program.module(), test.images) == test.labels).sum()
    test_acc = float(correct) / len(test)
    logged = run.data.metrics.get("test_acc")
    if logged is None:  # a trial whose test set was left to the study's end, never reached
        Run(tracker.client, run_id).metrics({"test_acc": test_acc},
                                            step=int(got.config.trainer.epochs))
    elif abs(logged - test_acc) > 1e-3:
        log.warning("the exported model's test accuracy %.4f differs from the trial's %.4f",
                    test_acc, logged)
    onnx = _onnx(served, example, folder / "model.onnx", test.images[:64]) if cfg.onnx else None
    if onnx is None and (folder / "model.onnx").exists():  # an earlier export's, not this model
        (folder / "model.onnx").unlink()
        log.info("removed %s: an earlier export's, and this one has none", folder / "model.onnx")
    meta = _metadata(got, run, study, test_acc, example, served, onnx is not None)
    model_uri = None
    if cfg.register:
        name = str(cfg.get("registered_model") or study or run.info.run_name)
        model_uri, version = log_and_register(
            served, example[:2], len(got.data.classes), tracker, run_id, name,
            _version_tags(meta), description=_description(meta))
        meta["registered_model"] = {"name": name, "version": version, "uri": model_uri}
    (folder / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    if recommended_by:
        Run(tracker.client, recommended_by).tags({
            "recommended.run_name": run.info.run_name, "recommended.export": str(pt2),
            **({"recommended.model": model_uri} if model_uri else {})})
    log.info("wrote %s (test accuracy %.4f%s)%s", pt2, test_acc,
             "" if logged is None else f", the trial's {logged:.4f}",
             f"; registered as {model_uri}" if model_uri else "")
    return Exported(run_id, folder, pt2, onnx, test_acc, logged, got.source, model_uri)


def _served(got: Trained, fold: bool) -> tuple[Served, torch.Tensor, Any]:
    """The served module, an example batch, and the test split it is checked on."""
    ds = got.config.dataset
    served = Served(got.net, int(ds.image_size), ds.mean, ds.std)
    test = got.data.test
    example = test.images[:8]
    if len(example) < 2:  # torch.export makes a batch of 1 a constant
        example = example.repeat(2, 1, 1, 1)
    if fold:
        served, folded = fold_batchnorm(served, test.images[:256])
        if folded:
            log.info("folded %d BatchNorm layers into their convolutions", folded)
    return served, example, test


def _onnx(served: Served, example: torch.Tensor, path: Path, check: torch.Tensor) -> Path | None:
    """``model.onnx`` beside the ``.pt2``, checked against the module when onnxruntime is
    installed; None (and a log line saying why) when it cannot be made."""
    try:
        to_onnx(served, example, path)
    except Exception as e:  # noqa: BLE001 - the .pt2 is the product; ONNX is a courtesy
        log.warning("no ONNX file: %s: %s", type(e).__name__, str(e).splitlines()[0][:300])
        return None
    try:
        import onnxruntime
    except ImportError:
        return path
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": check.numpy()})[0])
    with torch.no_grad():
        want = served(check)
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
        log.warning("%s differs from the PyTorch model (max difference %.3g); use model.pt2",
                    path, float((got - want).abs().max()))
    return path


def _metadata(got: Trained, run: Any, study: str | None, test_acc: float,
              example: torch.Tensor, served: Served, onnx: bool) -> dict[str, Any]:
    cfg = got.config
    m = run.data.metrics
    with torch.no_grad():
        classes = int(served(example[:2]).shape[1])
    return {
        "run_id": run.info.run_id, "run_name": run.info.run_name, "study": study,
        "backbone": str(cfg.backbone.name), "dataset": str(cfg.dataset.name),
        "strategy": str(cfg.freeze.get("strategy", "depth")),
        "unfrozen": int(cfg.freeze.unfrozen), "num_units": int(cfg.backbone.num_units),
        "weights_from": got.source, "weights_run_id": got.weights_run_id,
        "val_acc": m.get("val_acc"), "test_acc": m.get("test_acc"),
        "train_time_s": m.get("train_time_s"), "exported_test_acc": test_acc,
        "input": {"dtype": "uint8", "shape": ["batch", int(example.shape[1]), "height", "width"],
                  "resized_to": int(cfg.dataset.image_size),
                  "mean": list(cfg.dataset.mean), "std": list(cfg.dataset.std)},
        "output": {"logits": ["batch", classes],
                   "classes": [int(c) if str(c).isdigit() else c for c in got.data.classes]},
        "files": ["model.pt2", *(["model.onnx"] if onnx else [])],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _version_tags(meta: dict[str, Any]) -> dict[str, str]:
    """The registered version's tags: what the model is and how well it did (rounded to what
    a person reads; the run has the exact values)."""
    keep = ("study", "backbone", "dataset", "strategy", "unfrozen", "val_acc", "test_acc",
            "train_time_s", "run_id")
    tags = {}
    for key in keep:
        value = meta[key]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        tags[key] = f"{value:.2f}" if key == "train_time_s" else (
            f"{value:.4f}" if isinstance(value, float) else str(value))
    return tags


def _description(meta: dict[str, Any]) -> str:
    acc = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    return (f"{meta['backbone']} on {meta['dataset']}, last {meta['unfrozen']} of "
            f"{meta['num_units']} units fine-tuned ({meta['strategy']}); val_acc "
            f"{acc(meta['val_acc'])}, test_acc {acc(meta['test_acc'])}, trained in "
            f"{meta['train_time_s'] or 0:.1f} s. Input: uint8 images (N, "
            f"{meta['input']['shape'][1]}, H, W), resized to {meta['input']['resized_to']} px; "
            f"output: logits over {len(meta['output']['classes'])} classes. Study "
            f"{meta['study']}, MLflow run {meta['run_id']}.")
