"""Building a trial's model from a ``backbone/`` config, whatever its kind: the network, its
freeze units, its weights and a new head; and the unit count that the config derives from it.

A backbone config has a ``kind`` (where the network comes from) and a ``name`` (how studies,
runs, checkpoints and MLflow params label it); the settings each kind reads:

=============  =================================================================================
kind           settings (besides ``name``, ``kind``, ``num_units``, ``weights``, ``kwargs``)
=============  =================================================================================
torchvision    ``arch``: any torchvision classification model; the six families keep their
               hand-cut units (:mod:`._families`), the others follow the generic rule
               (:mod:`._torchvision`)
timm           ``arch``: any timm model; units from timm's layer grouping (:mod:`._timm`)
custom         ``target``: a callable returning an ``nn.Module``; ``units``: module paths in
               forward order; ``head``: the classifier (:mod:`._custom`)
=============  =================================================================================

``kwargs`` go to the network's builder. Any other key is an error that names it.

``num_units`` has one source per backbone: the six families write it in their config file
(checked against their tables when built); every other backbone derives it from its network
with the ``${sweeper.num_units:}`` resolver (registered by :mod:`sweeper.model`; the network is
built on the meta device, so counting costs no weights), which is what
``python -m sweeper.run --cfg job --resolve`` prints and what the search space reads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError
from torch import nn

from sweeper.errors import UserError
from sweeper.model import _custom, _timm, _torchvision
from sweeper.model._families import Parts
from sweeper.model._freeze import FreezeNet
from sweeper.model._weights import StateDict, from_file, from_timm, from_torchvision, load_into

log = logging.getLogger(__name__)

COMMON = ("name", "kind", "num_units", "weights", "kwargs", "pretrain")
KINDS: dict[str, tuple[str, ...]] = {
    "torchvision": ("arch",),
    "timm": ("arch",),
    "custom": ("target", "units", "head"),
}


def kind_of(backbone: DictConfig) -> str:
    """The backbone's kind (configs logged before kinds existed named a torchvision family)."""
    return str(backbone.get("kind") or "torchvision")


def _arch(backbone: DictConfig) -> str:
    arch = backbone.get("arch")
    return str(arch if arch is not None else backbone.name)


def describe(backbone: DictConfig) -> str:
    """How messages name the network: ``torchvision's resnet34``, ``timm's resnet18``, ..."""
    kind = kind_of(backbone)
    return str(backbone.target) if kind == "custom" else f"{kind}'s {_arch(backbone)}"


def backbone_kwargs(backbone: DictConfig) -> dict:
    """Extra keyword arguments for the network's builder (e.g. ViT's ``image_size``)."""
    kwargs = backbone.get("kwargs")
    return OmegaConf.to_container(kwargs, resolve=True) if kwargs else {}


def _missing(backbone: DictConfig, key: str) -> bool:
    return key not in backbone or OmegaConf.is_missing(backbone, key) or backbone[key] is None


def _check_settings(backbone: DictConfig) -> None:
    """The kind is known, every key is one of its settings, the ones it needs are set."""
    kind = kind_of(backbone)
    if kind not in KINDS:
        raise UserError(f"backbone.kind={kind} is not a kind of backbone: use torchvision, timm or "
                        "custom (backbone=torchvision|timm|custom picks a packaged config).")
    settings = (*COMMON, *KINDS[kind])
    unknown = [k for k in backbone if k not in settings]
    if unknown:
        raise UserError(
            f"backbone.{unknown[0]} is not a setting of a {kind} backbone (its settings: "
            f"{', '.join(settings)}); nothing would read it. Another torchvision model: "
            "backbone=torchvision backbone.arch=NAME; a timm model: backbone=timm "
            "backbone.arch=NAME; your own module: backbone=custom backbone.target=pkg.module.fn "
            "backbone.units=[...] backbone.head=NAME.")
    needed = {"torchvision": ("arch",), "timm": ("arch",), "custom": ("target", "units", "head")}
    if kind == "torchvision" and "arch" not in backbone:
        needed["torchvision"] = ()  # a config from before kinds: name is the arch
    unset = [k for k in needed[kind] if _missing(backbone, k)]
    if unset:
        example = {"torchvision": "backbone.arch=resnet34", "timm": "backbone.arch=resnet18",
                   "custom": "backbone.target=my_pkg.models.build backbone.units=[stem,layer1,"
                             "layer2] backbone.head=fc"}[kind]
        raise UserError(f"A {kind} backbone needs backbone.{unset[0]}, e.g. {example}.")
    if kind == "custom" and not OmegaConf.is_list(backbone.units):
        raise UserError(f"backbone.units={backbone.units} must be a list of module paths in "
                        "forward order, e.g. backbone.units=[stem,layer1,layer2].")
    if kind == "torchvision":
        _torchvision.check_arch(_arch(backbone))
    elif kind == "timm":
        _timm.check_arch(_arch(backbone))


def check_backbone(backbone: DictConfig, unfrozen: int | None = None,
                   transferred: int | None = None) -> None:
    """Fail early, with what to do, on a backbone config or freeze depth that cannot work."""
    _check_settings(backbone)
    num_units = int(backbone.num_units)
    if unfrozen is not None and not 0 <= int(unfrozen) <= num_units:
        raise UserError(
            f"freeze.unfrozen={unfrozen} is outside 0..{num_units}: {backbone.name} has "
            f"{num_units} freeze units (0 trains the head only, {num_units} trains everything)."
        )
    if transferred is not None and not 0 <= int(transferred) <= num_units:
        raise UserError(f"freeze.transferred={transferred} is outside 0..{num_units} "
                        "(null keeps every pretrained unit).")


def network(backbone: DictConfig) -> nn.Module:
    """The backbone's network with random weights, classifier included."""
    kind, kwargs = kind_of(backbone), backbone_kwargs(backbone)
    if kind == "custom":
        return _custom.make(str(backbone.target), **kwargs)
    if kind == "timm":
        return _timm.make(_arch(backbone), **kwargs)
    return _torchvision.make(_arch(backbone), **kwargs)


def cut(backbone: DictConfig, model: nn.Module) -> Parts:
    """``model`` (the backbone's network) cut into its freeze units."""
    kind = kind_of(backbone)
    if kind == "custom":
        return _custom.cut(str(backbone.target), model, list(backbone.units), str(backbone.head))
    if kind == "timm":
        return _timm.cut(_arch(backbone), model)
    return _torchvision.cut(_arch(backbone), model)


def identity(backbone: DictConfig) -> dict[str, Any]:
    """What determines the network and so its weights (not its label): keys pretrained
    checkpoints (:mod:`sweeper.pretrain`)."""
    kind = kind_of(backbone)
    if kind == "torchvision":  # as keyed before kinds existed: checkpoints stay valid
        return {"name": _arch(backbone), "kwargs": backbone_kwargs(backbone)}
    what = str(backbone.target) if kind == "custom" else _arch(backbone)
    return {"kind": kind, "network": what, "kwargs": backbone_kwargs(backbone)}


class _CountError(UserError, InterpolationResolutionError):
    """A :class:`UserError` raised while OmegaConf resolves ``${sweeper.num_units:}``: OmegaConf
    passes its own error type through unwrapped, so Hydra still prints the message alone."""


_counts: dict[str, int] = {}


def count_units(backbone: DictConfig) -> int:
    """How many freeze units the backbone's network has (``${sweeper.num_units:}``)."""
    try:
        _check_settings(backbone)
        if kind_of(backbone) == "custom":
            return len(backbone.units)
        key = json.dumps(identity(backbone), sort_keys=True, default=str)
        if key not in _counts:
            try:
                with torch.device("meta"):  # no weights: only the structure is needed
                    model = network(backbone)
            except UserError:  # a builder that computes with its weights (RegNet): for real
                model = network(backbone)
            _counts[key] = len(cut(backbone, model).units)
        return _counts[key]
    except UserError as e:
        raise _CountError(str(e)) from None


_inputs: dict[str, str | None] = {}


def check_input(backbone: DictConfig, image_size: int, key: str = "dataset.image_size") -> None:
    """Fail, naming ``key``, unless the backbone's network takes 3-channel images of
    ``image_size`` pixels (a ViT's patch size, a network built for another size, images too
    small for its downsampling). Tried with one image on the meta device (no weights, no
    compute), and only when that fails, for real on the CPU (some operations have no meta
    version), once per network and size in a process."""
    _check_settings(backbone)
    probe = json.dumps([identity(backbone), int(image_size)], sort_keys=True, default=str)
    if probe not in _inputs:
        _inputs[probe] = _forward_problem(backbone, int(image_size))
    if _inputs[probe] is not None:
        raise UserError(f"{key}={image_size}: {describe(backbone)} cannot take "
                        f"{image_size}x{image_size} images ({_inputs[probe]}).")


def _forward_problem(backbone: DictConfig, size: int) -> str | None:
    """None when one image of ``size`` pixels goes through the network, else what went wrong
    and what would work."""
    try:
        with torch.device("meta"):
            network(backbone).eval()(torch.empty(1, 3, size, size))
        return None
    except UserError as e:
        if not _about_size(str(e)):
            raise
    except Exception:  # noqa: BLE001 - tried again for real below, where the error counts
        pass
    model = None
    try:
        model = network(backbone).eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
        return None
    except UserError as e:  # a builder given the image size (a ViT) refused it
        if not _about_size(str(e)):
            raise
        said = str(e).strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001 - whatever the network says about this input
        said = (str(e).strip().splitlines() or [type(e).__name__])[0]
    hints = []
    patch = getattr(model, "patch_size", None) if model is not None else None
    patch_embed = getattr(model, "patch_embed", None)
    if patch is None and patch_embed is not None:
        patch = getattr(patch_embed, "patch_size", None)
    if isinstance(patch, (tuple, list)):
        patch = patch[0]
    if patch is None and "patch" in said.lower():
        patch = "its patch size"
    if patch is not None:
        hints.append(f"use a multiple of {patch}")
    if "expected" in said.lower() or "doesn't match" in said.lower():
        arg = "img_size" if kind_of(backbone) == "timm" else "image_size"
        hints.append(f"build it for this size: '+backbone.kwargs.{arg}=${{dataset.image_size}}'")
    if "too small" in said.lower():
        hints.append("use larger images")
    return said + ("; " + "; ".join(hints) if hints else "")


def _about_size(message: str) -> bool:
    return any(w in message.lower() for w in ("patch", "size", "shape"))


# backbone.num_units of every backbone that is not a hand-cut family: derived from its network.
OmegaConf.register_new_resolver("sweeper.num_units", lambda *, _parent_: count_units(_parent_),
                                replace=True)


def named_weights(backbone: DictConfig, weights: str) -> tuple[StateDict, str]:
    """The library weights ``weights`` names (``DEFAULT``, an enum name, a timm tag) for the
    backbone, and a description of their origin (tag ``weights``)."""
    kind = kind_of(backbone)
    if kind == "timm":
        return from_timm(_arch(backbone), weights, backbone_kwargs(backbone))
    if kind == "custom":
        raise UserError(f"backbone.weights={weights}: a custom backbone takes none (the module as "
                        "backbone.target returns it), source, or the path of a state-dict file.")
    arch = _arch(backbone)
    state = from_torchvision(arch, weights)
    return state, f"torchvision:{_torchvision.weights_enum(arch).__name__}.{weights}"


def weights_from_file(backbone: DictConfig, path: str) -> StateDict:
    """The state dict in ``path`` for this backbone (timm's loader for timm models, which also
    adapts e.g. a position embedding to ``img_size``)."""
    if kind_of(backbone) == "timm":
        return from_timm(_arch(backbone), "file", backbone_kwargs(backbone), file=path)[0]
    return from_file(path)


# The last network built from random weights in this process (its identity, the random
# generator's state before, a copy): a trial's network is rebuilt by copying it (its random
# init, which the pretrained weights then mostly replace, costs several times a copy on the
# CPU). And what building each network did to the generator, by (identity, state before): a
# study's repeats start from a few seeds in turn, and a copy that loads pretrained weights
# needs only the network's structure and that state after, not the values of that seed's init.
_LAST: tuple[str, str, nn.Module] | None = None
_RNG_AFTER: dict[tuple[str, str], torch.Tensor] = {}
_RNG_KEEP = 64


def _fresh_network(backbone: DictConfig, blank: bool = False) -> nn.Module:
    """:func:`network`, leaving torch's random generator as building it would: a copy of the
    last one built in this process when that was the same network from the same generator
    state (library builders are pure functions of their arguments and the generator; a
    custom builder is always called).

    ``blank``: the caller overwrites every weight (it loads pretrained ones), so a copy gets
    uninitialised tensors instead of the random ones' values (copying them was most of a
    copy's time: it is memory-bound); then the last network built of the same kind is copied
    whatever generator state built it, when building from this state was seen before."""
    global _LAST
    if kind_of(backbone) == "custom":
        return network(backbone)
    net = json.dumps(identity(backbone), sort_keys=True, default=str)
    state = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    after = _RNG_AFTER.get((net, state))
    if after is not None and _LAST is not None and _LAST[0] == net and (blank or _LAST[1] == state):
        torch.set_rng_state(after)
        model = _LAST[2]
        memo = {id(t): _uninitialised(t) for t in model.state_dict(keep_vars=True).values()} \
            if blank else {}
        return copy.deepcopy(model, memo)
    model = network(backbone)
    _LAST = (net, state, copy.deepcopy(model))
    _RNG_AFTER[(net, state)] = torch.get_rng_state()
    while len(_RNG_AFTER) > _RNG_KEEP:
        del _RNG_AFTER[next(iter(_RNG_AFTER))]
    return model


def _uninitialised(t: torch.Tensor) -> torch.Tensor:
    """A tensor (a parameter, for a parameter) like ``t`` with uninitialised values."""
    if isinstance(t, nn.Parameter):
        return nn.Parameter(torch.empty_like(t), requires_grad=t.requires_grad)
    return torch.empty_like(t)


def _reinitialise(unit: nn.Module) -> None:
    for module in unit.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def build(backbone: DictConfig, num_classes: int, unfrozen: int,
          state: StateDict | None, origin: str = "",
          transferred: int | None = None) -> tuple[FreezeNet, nn.Module]:
    """A :class:`FreezeNet` for ``num_classes`` with the last ``unfrozen`` units trainable.

    ``transferred=n`` keeps the pretrained weights of the first ``n`` units only and
    re-initialises the others (the AnB design of Yosinski et al. 2014); ``None`` keeps all.

    Returns the net and the network it was cut from: they share parameters, so the network's
    ``state_dict()`` holds the backbone in its library's own key format (with ``state``, its
    classifier, which the new head replaces, is zeros).
    """
    check_backbone(backbone, unfrozen, transferred)
    model = _fresh_network(backbone, blank=state is not None)
    parts = cut(backbone, model)
    if state is not None:  # the units share the network's tensors: loading fills them too
        load_into(model, parts.classifier, state, origin, str(backbone.name))
        classifier = dict(model.named_modules()).get(parts.classifier)
        with torch.no_grad():  # the classifier the head replaces: not loaded, never read
            for t in (classifier.state_dict().values() if classifier is not None else ()):
                t.zero_()
    if len(parts.units) != int(backbone.num_units):
        raise UserError(f"backbone.num_units={backbone.num_units} but {describe(backbone)} has "
                        f"{len(parts.units)} freeze units; fix num_units in the backbone's config "
                        f"(conf/backbone/{backbone.name}.yaml), or leave it to "
                        "${sweeper.num_units:}.")
    if transferred is not None:
        for unit in parts.units[int(transferred):]:
            _reinitialise(unit)
    head: nn.Module = nn.Linear(parts.feature_dim, num_classes)
    if parts.head_dropout:
        head = nn.Sequential(nn.Dropout(parts.head_dropout), head)
    return FreezeNet(parts.units, parts.unit_names, head, int(unfrozen)), model
