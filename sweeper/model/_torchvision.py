"""Any torchvision classification model cut into freeze units: the six hand-cut families by
their tables (:mod:`sweeper.model._families`), every other model by one generic rule.

The generic rule, on the model's module tree (torchvision names its stages and blocks
consistently enough for it):

- a **stage** is a container (``nn.Sequential``, ``ModuleList``, ``ModuleDict``) that holds
  modules with submodules of their own; each of those is a **block**, one freeze unit (a
  stage inside a stage is walked into: RegNet's trunk, its stages, their blocks);
- a direct child of the model that is not a stage but holds one (ViT's encoder) is walked
  into as well; any other direct child with submodules (a stem block) is a block;
- a flat stage of plain layers with two or more convolutions (VGG's and AlexNet's
  ``features``) is cut after each pooling layer;
- the **classifier** is the model's last ``nn.Linear``: the new head replaces it.

:mod:`sweeper.model._split` then cuts the traced forward at the blocks: layers before the
first block (ResNet's conv1/bn1/relu/maxpool, ViT's patch embedding) are the stem unit;
pooling, flatten and pre-logits layers after the last block join the last unit; blocks that
cannot be cut apart because more than one tensor flows between them (DenseNet's dense layers
all feed their block's concatenation) become one unit. ResNet-34: stem + 16 blocks;
DenseNet-121: stem, 4 dense blocks, 3 transitions; EfficientNet-V2-S: 42; Swin-T: 16.
"""

from __future__ import annotations

import difflib

import torchvision
from torch import nn

from sweeper.errors import UserError
from sweeper.model._families import FAMILIES, Parts
from sweeper.model._families import cut as cut_family
from sweeper.model._split import Group, split

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
          nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)


def archs() -> list[str]:
    """torchvision's classification models (``torchvision.models.list_models``)."""
    return torchvision.models.list_models(module=torchvision.models)


def check_arch(arch: str) -> None:
    if arch not in archs():
        close = difflib.get_close_matches(arch, archs(), n=5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"backbone.arch={arch} is not a torchvision classification model.{hint} "
                        "The list: python -c 'import torchvision; "
                        "print(torchvision.models.list_models(module=torchvision.models))'")


def make(arch: str, **kwargs) -> nn.Module:
    """torchvision's ``arch`` with random weights (weights are loaded separately)."""
    check_arch(arch)
    try:
        return torchvision.models.get_model(arch, weights=None, **kwargs)
    except Exception as e:  # noqa: BLE001 - a builder refusing the kwargs is the user's to fix
        raise UserError(f"torchvision could not build {arch} with backbone.kwargs={kwargs} "
                        f"({type(e).__name__}: {e}).") from None


def cut(arch: str, model: nn.Module) -> Parts:
    """``model`` (torchvision's ``arch``) cut into freeze units."""
    if arch in FAMILIES:
        return cut_family(arch, model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"torchvision's {arch} has no nn.Linear classifier (its classifier is "
                        "convolutional) and cannot take a new linear head; choose another "
                        "model, or wrap it with backbone=custom.")
    head = linears[-1]
    parts = split(model, _blocks(model, head), head, what=f"torchvision's {arch}")
    feature_dim = model.get_submodule(head).in_features
    return Parts(parts.units, parts.unit_names, feature_dim, parts.head_dropout, head)


def weights_enum(arch: str) -> type[torchvision.models.WeightsEnum]:
    return torchvision.models.get_model_weights(arch)


def _has_children(m: nn.Module) -> bool:
    return any(True for _ in m.children())


def _is_stage(m: nn.Module) -> bool:
    return isinstance(m, _CONTAINERS) and any(_has_children(c) for c in m.children())


def _is_flat_stage(m: nn.Module) -> bool:
    children = list(m.children())
    return (isinstance(m, _CONTAINERS) and not any(_has_children(c) for c in children)
            and sum(isinstance(c, nn.modules.conv._ConvNd) for c in children) >= 2)


def _flat_blocks(m: nn.Module, path: str) -> list[Group]:
    groups, current = [], []
    for name, child in m.named_children():
        current.append(name)
        if isinstance(child, _POOLS):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return [Group(f"{path}[{g[0]}:{g[-1]}]", [f"{path}.{n}" for n in g]) for g in groups]


def _blocks(model: nn.Module, head: str) -> list[Group]:
    """The blocks of ``model`` in registration order (the cut orders them by the forward)."""
    out: list[Group] = []

    def walk(m: nn.Module, path: str, top: bool) -> None:
        for name, child in m.named_children():
            p = f"{path}.{name}" if path else name
            if p == head or head.startswith(p + "."):
                continue  # the classifier and the container holding it
            if _is_flat_stage(child):
                out.extend(_flat_blocks(child, p))
            elif not _has_children(child):
                continue  # a plain layer between blocks
            elif _is_stage(child) or (top and any(_is_stage(c) for c in child.children())):
                walk(child, p, top=not _is_stage(child))
            else:
                out.append(Group(p, [p]))

    walk(model, "", top=True)
    return out
