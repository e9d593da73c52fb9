"""The six hand-cut torchvision families: the one place that decides what a "layer" is for them
(any other network is cut by a rule: :mod:`sweeper.model._torchvision`, ``_timm``, ``_custom``).

Every family becomes an ordered list of backbone units whose composition is the torchvision
model's own forward up to (and including) its pooled feature vector, followed by a new linear
head. Freezing is always a prefix of that list (:mod:`sweeper.model._freeze`).

=====================  ========================================================================
family                 what one unit is
=====================  ========================================================================
resnet18               stem (conv1, bn1, relu, maxpool); each of the 8 basic blocks
resnet50               stem; each of the 16 bottleneck blocks
mobilenet_v3_small     each entry of ``features`` (stem conv, 11 inverted-residual blocks, last
                       conv); the last also holds the pooling and the pretrained pre-logits
                       layer (Linear 576->1024, Hardswish)
efficientnet_b0        stem conv; each of the 16 MBConv blocks; the last 1x1 conv
convnext_tiny          stem; each of the 18 ConvNeXt blocks, a downsampling layer going with the
                       first block after it; the last also holds the pooling and the pretrained
                       LayerNorm
vit_b_16               patch embedding (conv, class token, position embedding); each of the 12
                       encoder layers; the last also holds the final LayerNorm and takes the
                       class token
=====================  ========================================================================

How many units a family has is written once, as ``num_units`` in ``conf/backbone/<family>.yaml``
(tests check it against the cut made here).

The last backbone unit always ends in a flat feature vector, so the head is just a new
``Linear`` (with the family's dropout in front where it has one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.models import vision_transformer as tv_vit


@dataclass(frozen=True)
class Parts:
    """A network cut into its freeze units, plus the width and dropout of the head that
    replaces its classifier, and where that classifier is (its module path)."""

    units: list[nn.Module]
    unit_names: list[str]
    feature_dim: int
    head_dropout: float
    classifier: str = ""


class _Pooled(nn.Sequential):
    """A unit followed by global average pooling and flattening (and whatever comes after)."""


def _pool_flatten() -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]


def _cut_resnet(model: torchvision.models.ResNet) -> Parts:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    names = ["stem"] + [
        f"layer{i}.{j}"
        for i, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), 1)
        for j in range(len(layer))
    ]
    blocks[-1] = _Pooled(blocks[-1], *_pool_flatten())
    return Parts([stem, *blocks], names, model.fc.in_features, 0.0)


def _cut_mobilenet_v3(model: torchvision.models.MobileNetV3) -> Parts:
    features = list(model.features)
    names = [f"features.{i}" for i in range(len(features))]
    pre_logits = list(model.classifier)[:-1]  # Linear, Hardswish, Dropout: pretrained
    features[-1] = _Pooled(features[-1], *_pool_flatten(), *pre_logits)
    last = model.classifier[-1]
    return Parts(features, names, last.in_features, 0.0)


def _cut_efficientnet(model: torchvision.models.EfficientNet) -> Parts:
    stem, *stages, last = list(model.features)
    blocks = [b for stage in stages for b in stage]
    names = ["stem"] + [
        f"features.{i}.{j}" for i, stage in enumerate(stages, 1) for j in range(len(stage))
    ] + [f"features.{len(stages) + 1}"]
    last = _Pooled(last, *_pool_flatten())
    dropout = model.classifier[0].p
    return Parts([stem, *blocks, last], names, model.classifier[-1].in_features, dropout)


def _cut_convnext(model: torchvision.models.ConvNeXt) -> Parts:
    features = list(model.features)
    units: list[nn.Module] = [features[0]]
    names = ["stem"]
    pending_downsample: nn.Module | None = None
    for i, part in enumerate(features[1:], 1):
        if i % 2 == 0:  # features 2, 4, 6 are the downsampling layers between stages
            pending_downsample = part
            continue
        for j, block in enumerate(part):
            if pending_downsample is not None:
                block = nn.Sequential(pending_downsample, block)
                pending_downsample = None
            units.append(block)
            names.append(f"features.{i}.{j}")
    norm, flatten, last = model.classifier
    units[-1] = _Pooled(units[-1], model.avgpool, norm, flatten)
    return Parts(units, names, last.in_features, 0.0)


class _ViTEmbed(nn.Module):
    """Patch embedding, class token, position embedding and dropout of a VisionTransformer."""

    def __init__(self, model: tv_vit.VisionTransformer) -> None:
        super().__init__()
        self.conv_proj = model.conv_proj
        self.class_token = model.class_token
        self.pos_embedding = model.encoder.pos_embedding
        self.dropout = model.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (n, c, h, w) -> (n, hidden, h/p, w/p) -> (n, tokens, hidden), as VisionTransformer does
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class _ClassToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def _cut_vit(model: tv_vit.VisionTransformer) -> Parts:
    layers = list(model.encoder.layers)
    names = ["embed"] + [f"encoder.layers.{i}" for i in range(len(layers))]
    layers[-1] = _Pooled(layers[-1], model.encoder.ln, _ClassToken())
    head = model.heads.head
    return Parts([_ViTEmbed(model), *layers], names, head.in_features, 0.0)


@dataclass(frozen=True)
class Family:
    cut: Callable[[nn.Module], Parts]
    classifier: str  # module path of the classifier layer that the new head replaces


FAMILIES: dict[str, Family] = {
    "resnet18": Family(_cut_resnet, "fc"),
    "resnet50": Family(_cut_resnet, "fc"),
    "mobilenet_v3_small": Family(_cut_mobilenet_v3, "classifier.3"),
    "efficientnet_b0": Family(_cut_efficientnet, "classifier.1"),
    "convnext_tiny": Family(_cut_convnext, "classifier.2"),
    "vit_b_16": Family(_cut_vit, "heads.head"),
}


def cut(name: str, model: nn.Module) -> Parts:
    """Cut a torchvision model of family ``name`` into its freeze units."""
    family = FAMILIES[name]
    return dataclasses.replace(family.cut(model), classifier=family.classifier)
