"""A trial's pretrained weights: ``backbone.weights`` resolved, pretraining here for ``source``.

``backbone.weights`` is one of

- ``source``: the backbone pretrained here on a source task, once, and reused: the offline
  stand-in for ImageNet weights. The default source/target pair follows the AnB design of
  Yosinski et al. (2014) on Fashion-MNIST: pretrain on classes 0-4 (A), transfer to classes
  5-9 (B). The checkpoint is cached under ``paths.pretrained`` keyed by a hash of everything
  that determines it (backbone, source data, optimiser, epochs, seed), written atomically
  under a file lock so parallel trials pretrain once, and its pretraining is logged as an
  MLflow run of its own (tag ``sweeper.kind=pretrain``);
- ``DEFAULT`` or a name the backbone's library knows (a torchvision enum name such as
  ``IMAGENET1K_V1``, a timm tag such as ``a1_in1k``): :func:`sweeper.model.named_weights`;
- a path to a state dict of the architecture (:func:`sweeper.model.weights_from_file`);
- ``none``: no weights loaded (random initialisation; a custom backbone as its builder made it).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf, open_dict

from sweeper import data as data_mod
from sweeper import timing
from sweeper.device import place_model, resolve_device
from sweeper.errors import UserError, cannot_write, interruption
from sweeper.model import FreezeNet, StateDict, build, from_file, identity, named_weights, weights_from_file
from sweeper.schedule import check_warmup
from sweeper.tracking import Kind, Run, Tag, Tracker, config_params, environment_tags
from sweeper.train import evaluate, fit, reestimate_batchnorm

log = logging.getLogger(__name__)

_SOURCE = "source:"  # the origin of source-pretrained weights: "source:<checkpoint path>"


def resolve_weights(cfg: DictConfig) -> tuple[StateDict | None, str]:
    """The state dict that ``cfg.backbone.weights`` asks for, and a description of its origin
    (tag ``weights``); ``source`` pretrains the checkpoint first if it is not there yet."""
    weights = cfg.backbone.weights
    if weights is None or str(weights).lower() == "none":
        return None, "none"
    weights = str(weights)
    if weights == "source":
        path = source_checkpoint(cfg)
        return weights_from_file(cfg.backbone, str(path)), f"{_SOURCE}{path}"
    if names_a_file(weights):
        return weights_from_file(cfg.backbone, weights), weights
    return named_weights(cfg.backbone, weights)


def names_a_file(weights: str) -> bool:
    """Whether ``backbone.weights`` is a path (the other values are names: ``source``,
    ``none``, ``DEFAULT``, a library's weights name)."""
    return ("/" in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))
            or Path(weights).exists())


def pretrain_run_id(origin: str) -> str | None:
    """The MLflow run that pretrained the weights of ``origin`` (from :func:`resolve_weights`),
    when they were pretrained here and its record is there."""
    if not origin.startswith(_SOURCE):
        return None
    meta = Path(origin[len(_SOURCE):]).with_suffix(".json")
    return json.loads(meta.read_text()).get("mlflow_run_id") if meta.exists() else None


def checkpoint_key(cfg: DictConfig) -> dict:
    """What determines a source checkpoint: the network and the source task, not their labels
    or where a copy of the data is kept."""
    source = OmegaConf.to_container(cfg.source, resolve=True)
    for k in ("name", *data_mod.check(cfg.source.dataset).location):
        source["dataset"].pop(k, None)
    source["trainer"].pop("device", None)
    # Keys added since checkpoints were first cached, at the value that changes nothing, stay out
    # of the key: the same pretraining keeps its checkpoint.
    if source["optim"].get("layer_decay") == 1.0:
        source["optim"].pop("layer_decay")
    key = {"backbone": identity(cfg.backbone), "source": source}
    recipe = recipe_of(cfg.backbone)
    if recipe:  # a backbone without a recipe of its own keeps its checkpoint
        key["pretrain"] = recipe
    return key


RECIPE = {"warmup_epochs": 0.0, "zero_init_residual": False,  # the settings of backbone.pretrain
          "reestimate_bn": False}


def recipe_of(backbone: DictConfig) -> dict:
    """``backbone.pretrain``: how this network is pretrained from scratch on the source task,
    beyond ``source.optim`` (settings at their neutral value left out).

    - ``warmup_epochs``: the learning rate rises linearly over the first epochs' steps before
      the cosine decay (Goyal et al. 2017): a deep network from scratch at ``source.optim``'s
      rate diverges in its first steps without it;
    - ``zero_init_residual``: torchvision's own option for its ResNets, the last BatchNorm of
      each residual block starts at zero, so each block starts as the identity;
    - ``reestimate_bn``: after training, every BatchNorm layer's running statistics are
      re-estimated on the source training images (torch's ``update_bn``): networks whose
      BatchNorm momentum is 0.01 (torchvision's MobileNetV3 and EfficientNet) otherwise keep
      much of their initial statistics after a short pretraining, and are at chance in eval
      mode although they trained well.
    """
    given = backbone.get("pretrain")
    given = OmegaConf.to_container(given, resolve=True) if given else {}
    unknown = [k for k in given if k not in RECIPE]
    if unknown:
        raise UserError(f"backbone.pretrain.{unknown[0]} is not a setting of the source pretraining "
                        f"(its settings: {', '.join(RECIPE)}).")
    check_warmup(OmegaConf.create(given))
    return {k: v for k, v in given.items() if v != RECIPE[k]}


def zero_init_residual(network: torch.nn.Module) -> int:
    """What torchvision's ``zero_init_residual=True`` does to its ResNets: the last BatchNorm of
    every residual block (``bn3`` of a Bottleneck, ``bn2`` of a BasicBlock) gets zero scale.
    Returns the number of blocks; 0 for a network that has none."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    blocks = [m for m in network.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    for block in blocks:
        torch.nn.init.zeros_(block.bn3.weight if isinstance(block, Bottleneck) else block.bn2.weight)
    return len(blocks)


def checkpoint_path(cfg: DictConfig) -> Path:
    key = json.dumps(checkpoint_key(cfg), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.paths.pretrained) / f"{cfg.backbone.name}-{digest}.pt"


def _readable(path: Path) -> bool:
    try:
        from_file(path)  # kept in this process's memory: the trial loads it next
        return True
    except UserError:  # a truncated or corrupt file is rebuilt
        return False


def source_checkpoint(cfg: DictConfig) -> Path:
    """The path of the source-pretrained checkpoint for ``cfg``, pretraining it if needed."""
    return ensure_source(cfg)[0]


def ensure_source(cfg: DictConfig) -> tuple[Path, float]:
    """The source-pretrained checkpoint for ``cfg``, and the seconds spent pretraining it here
    (0 when it was already there)."""
    path = checkpoint_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):
        if path.exists() and _readable(path):
            return path, 0.0
        if path.exists():
            log.warning("Rebuilding unreadable source checkpoint %s", path)
        with timing.measure() as spent:
            _pretrain(cfg, path)
    return path, spent.s


def pretrain_if_needed(cfg: DictConfig) -> float:
    """Pretrain the checkpoint that ``backbone.weights=source`` asks for, unless it is there;
    the seconds spent pretraining (0 when nothing was done)."""
    if str(cfg.backbone.weights) != "source":
        return 0.0
    return ensure_source(cfg)[1]


def _reestimate_bn(model: FreezeNet, data: data_mod.Data, device: torch.device,
                   batch_size: int, run: Run) -> None:
    """``reestimate_bn``: every unit's BatchNorm statistics re-estimated on the source training
    images, the way ``freeze.bn_stats=target`` does it for frozen units (all of them frozen
    for it, then trainable again)."""
    unfrozen = model.unfrozen
    model.set_unfrozen(0)
    found, spent = reestimate_batchnorm(model, data.train, data.normalize, device, batch_size)
    model.set_unfrozen(unfrozen)
    log.info("%d BatchNorm layers re-estimated on %d source images (%.2fs)", found,
             len(data.train), spent)
    run.metrics({"bn_stats_time_s": spent})


def _pretrain(cfg: DictConfig, path: Path) -> None:
    src = cfg.source
    log.info("Pretraining %s on the source task (%s, classes %s) -> %s",
             cfg.backbone.name, src.dataset.name, src.dataset.classes or "all", path)
    run = Tracker(cfg.tracking).start(
        f"pretrain-{path.stem}", tags={Tag.KIND: Kind.PRETRAIN, **environment_tags()})
    try:
        run.params(config_params(cfg, only=("backbone", "source")))
        device = resolve_device(str(src.trainer.device))
        torch.manual_seed(int(src.trainer.seed))
        data = data_mod.load(src.dataset)
        model, tv_model = build(cfg.backbone, len(data.classes), int(cfg.backbone.num_units), None)
        recipe = recipe_of(cfg.backbone)
        if recipe.get("zero_init_residual"):
            zero_init_residual(tv_model)
        optim = src.optim
        if recipe.get("warmup_epochs"):
            optim = copy.deepcopy(src.optim)
            with open_dict(optim):
                optim.warmup_epochs = recipe["warmup_epochs"]
        place_model(model, device)
        result = fit(model, data, src.trainer, optim, device,
                     on_epoch=lambda s: run.metrics(s.metrics(), step=s.epoch))
        if recipe.get("reestimate_bn"):
            _reestimate_bn(model, data, device, int(src.trainer.batch_size), run)
        test_acc = evaluate(model, data.test, data.normalize.to(device), device,
                            int(src.trainer.batch_size), bool(src.trainer.amp))
        train_time_s = result.time.train_time_s
        run.metrics({"val_acc": result.val_acc, "test_acc": test_acc, **result.time.totals()},
                    step=len(result.epochs))
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        state = {k: v.cpu().contiguous() for k, v in tv_model.state_dict().items()}  # NCHW on disk
        buffer = io.BytesIO()  # written by Python, whose errors say a disk is full (torch's do not)
        torch.save({"state_dict": state}, buffer)
        try:
            tmp.write_bytes(buffer.getbuffer())
            os.replace(tmp, path)
            path.with_suffix(".json").write_text(json.dumps(
                {"key": checkpoint_key(cfg), "mlflow_run_id": run.run_id,
                 "val_acc": result.val_acc, "test_acc": test_acc, "train_time_s": train_time_s},
                indent=2))
        except OSError as e:  # a full disk: no partial checkpoint is left behind
            tmp.unlink(missing_ok=True)
            raise cannot_write("the source checkpoint", path, e, "paths.pretrained") from None
        run.tags({Tag.CHECKPOINT: str(path)})
        log.info("Source pretraining done: test accuracy %.3f in %.1fs", test_acc, train_time_s)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: KILLED, as a trial's run
        run.end("KILLED", interruption())
        raise
    except BaseException as e:
        run.end("FAILED", e)
        raise
    run.end()
