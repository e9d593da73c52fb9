"""The model of a trial: a backbone cut into freeze units, its weights, a new head.

- :func:`build` makes a :class:`FreezeNet` from a ``backbone/`` config of any kind
  (``torchvision``: any torchvision classification model, the six families by their hand-cut
  tables ``FAMILIES``; ``timm``: any timm model, by timm's layer grouping; ``custom``: your own
  module and the units you name): the network's freeze units, pretrained weights loaded into
  them, the last ``unfrozen`` units trainable and the rest frozen completely;
- :func:`check_input` says whether the network takes images of a given size (checked
  before any work, by :mod:`sweeper.validate`);
- :func:`count_units` says how many units a backbone has: the ``${sweeper.num_units:}``
  resolver that backbone configs use, registered when this package is imported;
- :func:`named_weights`, :func:`weights_from_file`, :func:`from_torchvision`,
  :func:`from_file` and :func:`load_into` get weights and fit them into a backbone
  (``backbone.weights=source`` is :mod:`sweeper.pretrain`'s).

Example::

    from omegaconf import OmegaConf
    from sweeper.model import build

    backbone = OmegaConf.create({"name": "resnet34", "kind": "torchvision", "arch": "resnet34",
                                 "num_units": "${sweeper.num_units:}"})
    net, _ = build(backbone, num_classes=5, unfrozen=2, state=None)
    net.count_parameters()   # (trainable, frozen)
"""

from sweeper.model._build import (
    backbone_kwargs,
    build,
    check_backbone,
    check_input,
    count_units,
    describe,
    identity,
    named_weights,
    weights_from_file,
)
from sweeper.model._families import FAMILIES, Family
from sweeper.model._freeze import FreezeNet
from sweeper.model._weights import StateDict, from_file, from_torchvision, load_into

__all__ = ["FAMILIES", "Family", "FreezeNet", "StateDict", "backbone_kwargs", "build",
           "check_backbone", "check_input", "count_units", "describe", "from_file", "from_torchvision",
           "identity", "load_into", "named_weights", "weights_from_file"]
