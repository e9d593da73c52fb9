"""The served model: a trained :class:`~sweeper.model.FreezeNet` and its input preprocessing as
one module in eval mode, BatchNorm folded into its convolutions, exported to one file.

Its input is what the project's data path starts from, a batch of ``uint8`` images
``(N, C, H, W)`` of any size; inside it does what the data path does on such batches: resize to
the trained ``image_size`` (bilinear, antialiased), scale to [0, 1], grey to 3 channels,
normalise with the dataset's mean and std. Its output is the logits ``(N, classes)``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from sweeper.data import Normalize
from sweeper.model import FreezeNet

log = logging.getLogger("sweeper.export")
for _noisy in ("onnx_ir", "onnxscript"):  # a line per optimisation pass of the ONNX exporter
    logging.getLogger(_noisy).setLevel(logging.WARNING)


class Served(nn.Module):
    """Preprocessing, every freeze unit (frozen or trained alike) and the head, in eval mode.

    The preprocessing is the data path's own :class:`~sweeper.data.Normalize` (scale, grey to
    3 channels, normalise), then a resize to ``image_size``: resizing after normalising gives
    what resizing first would (both are linear, and the resize's weights sum to 1).
    """

    def __init__(self, net: FreezeNet, image_size: int, mean, std) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.units = nn.Sequential(*copy.deepcopy(list(net.units)))
        self.head = copy.deepcopy(net.head)
        self.image_size = int(image_size)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=True)
        return self.head(self.units(x))


def fold_batchnorm(served: Served, check: torch.Tensor) -> tuple[Served, int]:
    """``served`` with each BatchNorm that follows a convolution folded into it (torch.fx's
    ``fuse``, per freeze unit), when the outputs on ``check`` (a uint8 batch) stay equal: the
    same predictions and logits within float rounding. Returns the model and how many
    BatchNorm layers were folded (0: the model unchanged)."""
    from torch.fx.experimental.optimization import fuse

    def count(m: nn.Module) -> int:
        return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())

    folded = copy.deepcopy(served)
    for i, unit in enumerate(folded.units):
        try:  # a unit that torch.fx cannot trace symbolically keeps its BatchNorm layers
            folded.units[i] = fuse(unit, inplace=True)
        except Exception as e:  # noqa: BLE001 - tracing fails in many ways; folding is optional
            log.debug("unit %d (%s) not folded: %s", i, type(unit).__name__, e)
    found = count(served.units) - count(folded.units)
    if not found:
        return served, 0
    with torch.no_grad():
        before, after = served(check), folded(check)
    same = torch.equal(before.argmax(1), after.argmax(1))
    close = torch.allclose(before, after, rtol=1e-4, atol=1e-4 * float(before.abs().max()) + 1e-5)
    if not (same and close):
        log.info("BatchNorm not folded: it changes the outputs (max difference %.2g)",
                 float((before - after).abs().max()))
        return served, 0
    return folded, found


def dynamic_shapes(example: torch.Tensor) -> tuple[dict[int, Dim], ...]:
    """Any batch size and any image height and width; the channels are the trained ones."""
    return ({0: Dim("batch"), 2: Dim("height", min=2), 3: Dim("width", min=2)},)


def to_pt2(served: nn.Module, example: torch.Tensor, path: Path) -> torch.export.ExportedProgram:
    """``served`` exported with ``torch.export`` and saved to ``path`` (``.pt2``)."""
    program = torch.export.export(served, (example,), dynamic_shapes=dynamic_shapes(example))
    torch.export.save(program, path)
    return program


def to_onnx(served: nn.Module, example: torch.Tensor, path: Path) -> None:
    """``served`` exported to ONNX (torch's dynamo exporter: needs onnx and onnxscript)."""
    torch.onnx.export(served, (example,), str(path), dynamo=True, verbose=False, external_data=False,
                      input_names=["images"], output_names=["logits"],
                      dynamic_shapes=dynamic_shapes(example))
