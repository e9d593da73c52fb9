"""Loading pretrained weights into a backbone: torchvision's weights, or a state-dict file.

- torchvision's weights API and cache (``DEFAULT`` or an enum name such as ``IMAGENET1K_V1``;
  ``$TORCH_HOME/hub/checkpoints/<file>``): downloads when online, loads offline when the file
  is already there;
- a state dict of the torchvision architecture in a file (a checkpoint holding it under
  ``state_dict`` or ``model`` works too);
- :func:`load_into` fits either into a model and names whatever does not fit.

Which of them ``backbone.weights`` asks for, including ``source`` (pretrained here) and
``none``, is decided by :func:`sweeper.pretrain.resolve_weights`.
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import vision_transformer as tv_vit

from sweeper.errors import UserError
from sweeper.model._families import FAMILIES

StateDict = dict[str, torch.Tensor]


def from_torchvision(name: str, weights: str) -> StateDict:
    """The state dict of torchvision's ``weights`` for family ``name``, through its cache."""
    enum = FAMILIES[name].weights_enum
    try:
        w = enum[weights]
    except KeyError:
        names = ["DEFAULT", *(m.name for m in enum)]
        raise UserError(f"backbone.weights={weights} is not a weights file, 'source', 'none' or "
                        f"one of {name}'s torchvision weights: {', '.join(names)}.") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(w.url).path)
    try:
        return w.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise UserError(
            f"Could not download {enum.__name__}.{w.name} ({e}).\n"
            f"Offline, put the file at {cached}\n(download it from {w.url} on a machine with "
            "internet access; TORCH_HOME moves the cache), or use backbone.weights=source to "
            "pretrain here."
        ) from None


def from_file(path: str | os.PathLike) -> StateDict:
    """A state dict read from ``path`` (a bare state dict or a checkpoint holding one)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"backbone.weights={path}: no such file. Give the path of a state dict "
                        "saved with torch.save(model.state_dict(), path).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"backbone.weights={path} is not a readable PyTorch state dict ({e}).") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"backbone.weights={path} holds a {type(state).__name__}, not a state dict.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, name: str, state: StateDict, origin: str) -> None:
    """Load ``state`` into torchvision model ``model``, ignoring the classifier we replace.

    Any other missing or unexpected key, or a shape that does not fit, is a user error that
    names the first offenders.
    """
    replaced = FAMILIES[name].replaced_keys
    keep = lambda k: not k.startswith(replaced)  # noqa: E731
    if isinstance(model, tv_vit.VisionTransformer) and "encoder.pos_embedding" in state:
        if state["encoder.pos_embedding"].shape != model.encoder.pos_embedding.shape:
            # Weights for another image size: resample the position embedding, as torchvision does.
            state = tv_vit.interpolate_embeddings(model.image_size, model.patch_size, state)
    own = {k: v for k, v in model.state_dict().items() if keep(k)}
    given = {k: v for k, v in state.items() if keep(k)}
    missing = sorted(own.keys() - given.keys())
    unexpected = sorted(given.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & given.keys() if own[k].shape != given[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append("shapes that do not fit: " + ", ".join(
                f"{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3]))
        raise UserError(f"The weights from {origin} do not fit backbone {name}: "
                        + "; ".join(parts) + ". Use weights saved from the same architecture.")
    model.load_state_dict(given, strict=False)
