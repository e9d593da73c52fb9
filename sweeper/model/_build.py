"""Building a trial's model: a torchvision backbone, its weights, freeze units and a new head."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from torch import nn

from sweeper.errors import UserError
from sweeper.model._families import FAMILIES, build_torchvision, cut
from sweeper.model._freeze import FreezeNet
from sweeper.model._weights import StateDict, load_into


def check_backbone(backbone: DictConfig, unfrozen: int | None = None,
                   transferred: int | None = None) -> None:
    """Fail early, with what to do, on a backbone config or freeze depth that cannot work."""
    if backbone.name not in FAMILIES:
        raise UserError(f"backbone.name={backbone.name} is not supported; choose one of "
                        f"{', '.join(FAMILIES)}.")
    if unfrozen is not None and not 0 <= int(unfrozen) <= int(backbone.num_units):
        raise UserError(
            f"freeze.unfrozen={unfrozen} is outside 0..{backbone.num_units}: {backbone.name} has "
            f"{backbone.num_units} freeze units (0 trains the head only, {backbone.num_units} "
            "trains everything)."
        )
    if transferred is not None and not 0 <= int(transferred) <= int(backbone.num_units):
        raise UserError(f"freeze.transferred={transferred} is outside 0..{backbone.num_units} "
                        "(null keeps every pretrained unit).")


def backbone_kwargs(backbone: DictConfig) -> dict:
    """Extra keyword arguments for the torchvision builder (e.g. ViT's ``image_size``)."""
    kwargs = backbone.get("kwargs")
    return OmegaConf.to_container(kwargs, resolve=True) if kwargs else {}


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

    Returns the net and the torchvision model it was cut from: they share parameters, so the
    torchvision model's ``state_dict()`` holds the backbone in torchvision's own key format.
    """
    check_backbone(backbone, unfrozen, transferred)
    tv_model = build_torchvision(backbone.name, **backbone_kwargs(backbone))
    if state is not None:
        load_into(tv_model, backbone.name, state, origin)
    parts = cut(backbone.name, tv_model)
    if len(parts.units) != int(backbone.num_units):
        raise UserError(f"backbone.num_units={backbone.num_units} but {backbone.name} has "
                        f"{len(parts.units)} freeze units; fix conf/backbone/{backbone.name}.yaml.")
    if transferred is not None:
        for unit in parts.units[int(transferred):]:
            _reinitialise(unit)
    head: nn.Module = nn.Linear(parts.feature_dim, num_classes)
    if parts.head_dropout:
        head = nn.Sequential(nn.Dropout(parts.head_dropout), head)
    return FreezeNet(parts.units, parts.unit_names, head, int(unfrozen)), tv_model
