"""The model of a trial: a torchvision backbone cut into freeze units, its weights, a new head.

- :func:`build` makes a :class:`FreezeNet` from a ``backbone/`` config: the family's freeze
  units (``FAMILIES``; what a unit is per family), pretrained weights loaded into them, the
  last ``unfrozen`` units trainable and the rest frozen completely;
- :func:`from_torchvision`, :func:`from_file` and :func:`load_into` get weights and fit them
  into a backbone (``backbone.weights=source`` is :mod:`sweeper.pretrain`'s).

Example::

    from omegaconf import OmegaConf
    from sweeper.model import build

    backbone = OmegaConf.create({"name": "resnet18", "num_units": 9})
    net, _ = build(backbone, num_classes=5, unfrozen=2, state=None)
    net.count_parameters()   # (trainable, frozen)
"""

from sweeper.model._build import backbone_kwargs, build, check_backbone
from sweeper.model._families import FAMILIES, Family
from sweeper.model._freeze import FreezeNet
from sweeper.model._weights import StateDict, from_file, from_torchvision, load_into

__all__ = ["FAMILIES", "Family", "FreezeNet", "StateDict", "backbone_kwargs", "build",
           "check_backbone", "from_file", "from_torchvision", "load_into"]
