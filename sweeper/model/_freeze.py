"""Freezing a prefix of freeze units, completely: no gradients, no statistics, no optimizer.

"Frozen" here means all four of the things users expect and plain ``requires_grad=False`` does
not give on its own:

1. ``requires_grad=False`` on every parameter of a frozen unit;
2. frozen units stay in eval mode even after ``model.train()`` (BatchNorm running statistics
   and dropout do not change; pytorch #66073);
3. frozen parameters are never handed to the optimizer (no weight decay or momentum drift);
4. the frozen prefix runs under ``torch.no_grad()``: autograd never records it, so there is
   no backward pass through it and none of its activations are kept.

The frozen units are always a prefix, but the prefix may move during a run
(:meth:`FreezeNet.set_unfrozen`, asked for by a freeze strategy, :mod:`sweeper.schedule`):
all four hold again at once after every move.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from sweeper.device import layout


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
        self.units = nn.ModuleList(units)
        self.unit_names = list(unit_names)
        self.head = head
        # What a network leaves untrainable on purpose (a fixed position embedding, say) stays
        # so when its unit is unfrozen.
        self._learnable = {id(p) for p in self.units.parameters() if p.requires_grad}
        self.set_unfrozen(unfrozen)

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

    def set_unfrozen(self, unfrozen: int) -> None:
        """Make the last ``unfrozen`` units trainable and the others frozen, mid-run too.

        Newly frozen units lose their gradients and go to eval mode; newly unfrozen ones follow
        the net's mode. Which parameters the optimizer holds is the caller's to change
        (:func:`sweeper.train.follow_units`).
        """
        if not 0 <= unfrozen <= self.num_units:
            raise ValueError(f"unfrozen must be in 0..{self.num_units}, got {unfrozen}")
        self.unfrozen = unfrozen
        for i, unit in enumerate(self.units):
            trainable = i >= self.cut
            for p in unit.parameters():
                p.requires_grad_(trainable and id(p) in self._learnable)
                if not trainable:
                    p.grad = None
        self.train(self.training)

    def train(self, mode: bool = True) -> FreezeNet:
        super().train(mode)
        for unit in self.frozen_units():
            unit.eval()
        return self

    def forward_frozen(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The frozen prefix's output: a fixed function of ``x`` (eval mode, no autograd).

        ``x`` is the input of unit ``start`` (0: an image batch; a cut of the cache: that
        cut's rows), so only frozen units ``start..cut-1`` run.
        """
        if start > self.cut:
            raise ValueError(f"input of unit {start}, but units from {self.cut} on train: "
                             "those rows were computed through units that are no longer frozen")
        units = self.units[start:self.cut]
        with torch.no_grad():
            x = layout(x, training=False) if len(units) else x
            for unit in units:
                x = unit(x)
        return x

    def forward_trainable(self, h: torch.Tensor) -> torch.Tensor:
        h = layout(h, training=torch.is_grad_enabled())
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

    def unit_group(self, i: int, lr_backbone: float, layer_decay: float = 1.0) -> dict:
        """Unit ``i``'s optimizer parameter group: its learning rate is ``lr_backbone`` times
        ``layer_decay`` per unit between it and the top unit (timm's layer-wise decay); the
        group's ``unit`` is ``i`` and ``base_lr`` its rate before any schedule."""
        lr = lr_backbone * layer_decay ** (self.num_units - 1 - i)
        return {"params": list(self.units[i].parameters()), "lr": lr, "base_lr": lr,
                "name": self.unit_names[i], "unit": i}

    def param_groups(self, lr_head: float, lr_backbone: float, layer_decay: float = 1.0) -> list[dict]:
        """Optimizer parameter groups holding trainable parameters only: the head (``unit``
        None), then one group per trainable unit (:meth:`unit_group`)."""
        head = {"params": list(self.head.parameters()), "lr": lr_head, "base_lr": lr_head,
                "name": "head", "unit": None}
        return [head, *(self.unit_group(i, lr_backbone, layer_decay)
                        for i in range(self.cut, self.num_units))]

    def count_parameters(self) -> tuple[int, int]:
        """(trainable, frozen) parameter counts."""
        frozen = sum(p.numel() for u in self.frozen_units() for p in u.parameters())
        total = sum(p.numel() for p in self.parameters())
        return total - frozen, frozen
