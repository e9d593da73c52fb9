"""Freezing a prefix of freeze units, completely: no gradients, no statistics, no optimizer.

"Frozen" here means all four of the things users expect and plain ``requires_grad=False`` does
not give on its own:

1. ``requires_grad=False`` on every parameter of a frozen unit;
2. frozen units stay in eval mode even after ``model.train()`` (BatchNorm running statistics
   and dropout do not change; pytorch #66073);
3. frozen parameters are never handed to the optimizer (no weight decay or momentum drift);
4. the frozen prefix runs under ``torch.no_grad()``: autograd never records it, so there is
   no backward pass through it and none of its activations are kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn


class FreezeNet(nn.Module):
    """Backbone units followed by a new head, with all but the last ``unfrozen`` units frozen.

    ``unfrozen=0`` trains the head alone (a linear probe); ``unfrozen=num_units`` trains
    everything. The forward pass is ``head(suffix(prefix(x)))`` where ``prefix`` is the frozen
    units: :meth:`forward_frozen` and :meth:`forward_trainable` expose the cut, so that the
    output of the frozen prefix can be computed once and reused.
    """

    def __init__(self, units: list[nn.Module], unit_names: list[str], head: nn.Module,
                 unfrozen: int) -> None:
        super().__init__()
        if not 0 <= unfrozen <= len(units):
            raise ValueError(f"unfrozen must be in 0..{len(units)}, got {unfrozen}")
        self.units = nn.ModuleList(units)
        self.unit_names = list(unit_names)
        self.head = head
        self.unfrozen = unfrozen
        for unit in self.frozen_units():
            unit.requires_grad_(False)
        self.train()

    @property
    def num_units(self) -> int:
        return len(self.units)

    @property
    def cut(self) -> int:
        """Index of the first trainable unit (= number of frozen units)."""
        return self.num_units - self.unfrozen

    def frozen_units(self) -> list[nn.Module]:
        return list(self.units[: self.cut])

    def trainable_units(self) -> list[nn.Module]:
        return list(self.units[self.cut :])

    def train(self, mode: bool = True) -> FreezeNet:
        super().train(mode)
        for unit in self.frozen_units():
            unit.eval()
        return self

    def forward_frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's output: a fixed function of ``x`` (eval mode, no autograd)."""
        with torch.no_grad():
            for unit in self.frozen_units():
                x = unit(x)
        return x

    def forward_trainable(self, h: torch.Tensor) -> torch.Tensor:
        for unit in self.trainable_units():
            h = unit(h)
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_trainable(self.forward_frozen(x))

    def adapt_batchnorm(self, batches: Iterable[torch.Tensor]) -> int:
        """Re-estimate the frozen units' BatchNorm statistics on ``batches`` (AdaBN).

        The running mean and variance of every BatchNorm layer in the frozen prefix become the
        population statistics of the prefix's activations on ``batches`` (torch's
        ``update_bn``: cumulative average, no gradients); the prefix then stays frozen with
        them. Nothing else changes. Returns how many BatchNorm layers were re-estimated.
        """
        prefix = nn.Sequential(*self.frozen_units())
        found = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in prefix.modules())
        if found:
            torch.optim.swa_utils.update_bn(batches, prefix)
        self.train(self.training)  # frozen units back to eval mode
        return found

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of the unfrozen backbone units (not the head)."""
        for unit in self.trainable_units():
            yield from unit.parameters()

    def param_groups(self, lr_head: float, lr_backbone: float) -> list[dict]:
        """Optimizer parameter groups holding trainable parameters only."""
        groups = [{"params": list(self.head.parameters()), "lr": lr_head, "name": "head"}]
        backbone = list(self.backbone_parameters())
        if backbone:
            groups.append({"params": backbone, "lr": lr_backbone, "name": "backbone"})
        return groups

    def count_parameters(self) -> tuple[int, int]:
        """(trainable, frozen) parameter counts."""
        frozen = sum(p.numel() for u in self.frozen_units() for p in u.parameters())
        total = sum(p.numel() for p in self.parameters())
        return total - frozen, frozen
