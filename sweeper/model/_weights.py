"""Loading pretrained weights into a backbone: torchvision's, timm's, or a state-dict file.

- torchvision's weights API and cache (``DEFAULT`` or an enum name such as ``IMAGENET1K_V1``;
  ``$TORCH_HOME/hub/checkpoints/<file>``): downloads when online, loads offline when the file
  is already there;
- timm's pretrained weights (``DEFAULT`` or a tag such as ``a1_in1k``): from the local
  Hugging Face cache (or torch hub cache) when the file is there, without asking the network;
  downloaded by timm when online; otherwise an error naming the file and where to put it.
  timm's own loader fits them (e.g. a ViT's position embedding resampled to ``img_size``);
- a state dict of the architecture in a file (``.pt``/``.pth``/``.bin``, a checkpoint holding
  it under ``state_dict`` or ``model`` works too, or ``.safetensors``);
- :func:`load_into` fits any of them into a model and names whatever does not fit.

Which of them ``backbone.weights`` asks for, including ``source`` (pretrained here) and
``none``, is decided by :func:`sweeper.pretrain.resolve_weights`.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import vision_transformer as tv_vit

from sweeper.errors import UserError, first_line
from sweeper.model._torchvision import weights_enum

StateDict = dict[str, torch.Tensor]


def from_torchvision(name: str, weights: str) -> StateDict:
    """The state dict of torchvision's ``weights`` for model ``name``, through its cache."""
    enum = weights_enum(name)
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


# State dicts read in this process, by (path, mtime, size): the trials of a study load the
# same checkpoint one after the other. A rewritten file has another key; one entry is kept.
_FILES: dict[tuple[str, int, int], StateDict] = {}


def from_file(path: str | os.PathLike) -> StateDict:
    """A state dict read from ``path`` (a bare state dict or a checkpoint holding one).

    The tensors are shared with later calls for the same, unchanged file: load them into a
    model (which copies them), never change them in place.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"backbone.weights={path}: no such file. Give the path of a state dict "
                        "saved with torch.save(model.state_dict(), path).")
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _FILES:
        state = _read_state(path)
        _FILES.clear()
        _FILES[key] = state
    return dict(_FILES[key])


def _read_state(path: Path) -> StateDict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"backbone.weights={path} is not a readable state dict ({_why(e)}). "
                        "Save one with torch.save(model.state_dict(), path), or as .safetensors."
                        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"backbone.weights={path} holds a {type(state).__name__}, not a state dict.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _why(error: Exception) -> str:
    """Why torch could not read a file, without its advice to load it with
    ``weights_only=False``: that runs whatever code the file holds (unsafe for a file from
    elsewhere), and a state dict never needs it."""
    text = str(error)
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        return ("it holds Python objects, not only tensors"
                + (f" (first: {found.group(1)})" if found else "")
                + "; only tensors are loaded from a weights file")
    return f"not a file torch.save wrote: {type(error).__name__}: {first_line(error)}"


def from_timm(arch: str, weights: str, kwargs: dict, file: str | os.PathLike | None = None
              ) -> tuple[StateDict, str]:
    """timm's pretrained ``weights`` (``DEFAULT`` or a tag) for ``arch`` built with ``kwargs``,
    or the weights in ``file``, fitted by timm's own loader; and a description of the origin."""
    import timm

    base, _, tag = arch.partition(".")
    name = arch if file is not None or weights.upper() == "DEFAULT" else f"{base}.{weights}"
    overlay: dict = {}
    if file is not None:
        if not Path(file).is_file():
            raise UserError(f"backbone.weights={file}: no such file.")
        overlay, origin = {"file": str(file)}, str(file)
    else:
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError:  # a tag the architecture does not have
            cfg = None
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{base}.*")]
            raise UserError(f"backbone.weights={weights}: timm has no pretrained weights {name}. "
                            + (f"Its tags: {', '.join(tags)} (or DEFAULT)." if tags else
                               f"timm has no pretrained weights for {base}: use source or none."))
        origin = f"timm:{cfg.hf_hub_id or cfg.url}"
        local = _timm_cached(cfg)
        if local is not None:
            overlay = {"file": str(local)}  # no network: timm loads the cached file
        elif not _reachable(cfg):
            raise UserError(_timm_offline(name, cfg))
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - download or fit failures, reported with the origin
        raise UserError(f"timm could not load the weights {origin} into {name} with "
                        f"backbone.kwargs={kwargs} ({type(e).__name__}: {str(e)[:500]}).") from None
    return model.state_dict(), origin


def _timm_cached(cfg) -> Path | None:
    """The file timm would load for ``cfg``, when a cache already holds it."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else \
            ["model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
             "open_clip_pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if cached.is_file():
            return cached
    return None


def _reachable(cfg, timeout_s: float = 3.0) -> bool:
    """Whether timm's download source for ``cfg`` answers at all: offline, its retries would
    take a minute before failing."""
    from huggingface_hub import constants

    if cfg.hf_hub_id and constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT if cfg.hf_hub_id else cfg.url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _timm_offline(name: str, cfg) -> str:
    from huggingface_hub import constants

    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.partition("@")[0]
        filename = cfg.hf_hub_filename or "model.safetensors"
        folder = "models--" + repo.replace("/", "--")
        return (
            f"timm's weights {repo} ({filename}) are not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and {constants.ENDPOINT} cannot be reached.\n"
            "Offline, either fill the cache on a machine with internet access (python -c "
            f"\"import timm; timm.create_model('{name}', pretrained=True)\") and copy its folder "
            f"{folder} into {constants.HF_HUB_CACHE} here (HF_HOME moves the cache), or download "
            f"{constants.ENDPOINT}/{repo}/resolve/main/{filename} and give its path: "
            f"backbone.weights=/path/to/{filename}")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
    return (f"timm's weights for {name} are not cached and {cfg.url} cannot be reached.\n"
            f"Offline, put the file at {cached} (download it from {cfg.url} on a machine with "
            "internet access; TORCH_HOME moves the cache), or give its path: "
            "backbone.weights=/path/to/file")


def load_into(model: nn.Module, classifier: str, state: StateDict, origin: str, what: str) -> None:
    """Load ``state`` into ``model`` (``what``, for messages), ignoring its ``classifier``
    (the layer a new head replaces).

    Any other missing or unexpected key, or a shape that does not fit, is a user error that
    names the first offenders.
    """
    replaced = classifier + "."
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
        raise UserError(f"The weights from {origin} do not fit backbone {what}: "
                        + "; ".join(parts) + ". Use weights saved from the same architecture.")
    model.load_state_dict(given, strict=False)
