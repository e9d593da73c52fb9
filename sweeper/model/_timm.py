"""timm models cut into freeze units by timm's own grouping of their layers.

Every timm model says how its parameters group into layers, from the stem to the last block:
``model.group_matcher(coarse=False)`` read by ``timm.models.group_parameters``, the grouping
that timm's layer-wise learning-rate decay (``timm.optim.param_groups_layer_decay``) uses.
Models without a matcher fall back to ``timm.optim.auto_group_layers``, as that decay does.
Each group is one freeze unit. The group holding the classifier (``model.get_classifier()``)
is not a unit: the new head replaces the classifier, and whatever else it holds (a final norm,
pooling) joins the last unit. :mod:`sweeper.model._split` cuts the traced forward at the groups
(with timm's own list of modules and functions not to trace through), merging groups that
cannot be cut apart. ResNet-18: stem + 8 blocks; ViT-Ti/16: stem (patch embedding, class
token, position embedding) + 12 blocks (the last with the final norm); ConvNeXt-Atto: 13.
"""

from __future__ import annotations

import difflib
from collections import defaultdict

from torch import nn

from sweeper.errors import UserError
from sweeper.model._families import Parts
from sweeper.model._split import Group, split


def check_arch(arch: str) -> None:
    import timm

    base = arch.split(".", 1)[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"backbone.arch={arch} is not a timm model.{hint} The list: "
                        "python -c 'import timm; print(timm.list_models())'")


def make(arch: str, **kwargs) -> nn.Module:
    """timm's ``arch`` with random weights (weights are loaded separately)."""
    import timm

    check_arch(arch)
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - a model refusing the kwargs is the user's to fix
        raise UserError(f"timm could not build {arch} with backbone.kwargs={kwargs} "
                        f"({type(e).__name__}: {e}).") from None


def classifier(model: nn.Module, arch: str) -> str:
    """The module path of ``model``'s classifier, the layer a new head replaces."""
    found = model.get_classifier()
    path = next((n for n, m in model.named_modules() if m is found), None)
    if path is None or not isinstance(found, nn.Linear):
        raise UserError(f"timm's {arch} has no single nn.Linear classifier (get_classifier() "
                        f"returns {type(found).__name__}); choose a variant with one (e.g. not a "
                        "distilled model), or wrap it with backbone=custom.")
    return path


def groups(model: nn.Module, head: str) -> list[Group]:
    """timm's layer groups of ``model`` as unit candidates, the classifier's group left out."""
    from timm.models import group_parameters
    from timm.optim import auto_group_layers

    if hasattr(model, "group_matcher"):
        layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    else:
        layer_of = auto_group_layers(model)
    head_layers = {layer_of[f"{head}.{n}"] for n, _ in model.get_submodule(head).named_parameters()}
    modules: dict[int, list[str]] = defaultdict(list)
    params: dict[int, list[str]] = defaultdict(list)
    owned: list[str] = []
    # A group owns the largest modules whose parameters are all in it, and loose parameters.
    for name, module in model.named_modules():
        if not name or any(name.startswith(o + ".") for o in owned):
            continue
        layers = {layer_of[f"{name}.{n}"] for n, _ in module.named_parameters()}
        if len(layers) == 1:
            owned.append(name)
            (layer,) = layers
            if layer not in head_layers:
                modules[layer].append(name)
    for name, _ in model.named_parameters(recurse=False):
        if layer_of[name] not in head_layers:
            params[layer_of[name]].append(name)
    layers = sorted(set(modules) | set(params))
    return [Group(_name(modules[k] + params[k], i), modules[k], params[k])
            for i, k in enumerate(layers)]


def _name(paths: list[str], index: int) -> str:
    if len(paths) == 1:
        return paths[0]
    prefix = paths[0].split(".")[0]
    if all(p.split(".")[0] == prefix for p in paths):
        return prefix
    return "stem" if index == 0 else "+".join(paths)


def cut(arch: str, model: nn.Module) -> Parts:
    """``model`` (timm's ``arch``) cut into freeze units."""
    from timm.layers import get_notrace_functions, get_notrace_modules

    head = classifier(model, arch)
    parts = split(model, groups(model, head), head, what=f"timm's {arch}",
                  leaf_types=get_notrace_modules(),
                  autowrap_functions=[f for f in get_notrace_functions() if callable(f)])
    feature_dim = model.get_submodule(head).in_features
    return Parts(parts.units, parts.unit_names, feature_dim, parts.head_dropout, head)
