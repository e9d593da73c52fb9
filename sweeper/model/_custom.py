"""Your own network cut into the freeze units you name.

``backbone.target`` is any importable callable (``my_pkg.models.build``) that returns an
``nn.Module``, called with ``backbone.kwargs``; ``backbone.units`` lists module paths in
forward order (``[stem, layer1, layer2, layer3]``: what ``model.get_submodule`` takes), and
``backbone.head`` names the ``nn.Linear`` classifier that a new head replaces. The forward is
traced with the units as opaque modules and cut between them (:mod:`sweeper.model._split`,
strict): code between two units (an activation, a reshape) goes with the unit before it,
pooling and flattening after the last unit join it. Checked when the model is built, with one
message naming every problem: a path that is not a module, units that overlap or contain the
head, a module with parameters that runs outside every unit, units not in forward order or not
on the way to the head, and a tensor that skips over a cut.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.utils import get_object
from torch import nn

from sweeper.errors import UserError
from sweeper.model._families import Parts
from sweeper.model._split import Group, split


def make(target: str, **kwargs) -> nn.Module:
    """What ``target(**kwargs)`` returns, checked to be an ``nn.Module``."""
    try:
        build = get_object(target)
    except Exception as e:  # noqa: BLE001 - an import error of the user's code, reported whole
        raise UserError(f"backbone.target={target} cannot be imported ({e}). Give the dotted "
                        "path of a callable in an importable package or module (installed, or "
                        "in the folder you run from, which python -m puts on sys.path).") from None
    if not callable(build):
        raise UserError(f"backbone.target={target} is a {type(build).__name__}, not a callable "
                        "that returns an nn.Module.")
    try:
        model = build(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's builder failing is theirs to fix
        raise UserError(f"backbone.target={target} failed with backbone.kwargs={kwargs} "
                        f"({type(e).__name__}: {e}).") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"backbone.target={target} returned a {type(model).__name__}, not an "
                        "nn.Module.")
    return model


def cut(target: str, model: nn.Module, units: Sequence[str], head: str) -> Parts:
    """``model`` cut into ``units`` (module paths, in forward order), ``head`` replaced."""
    what = f"backbone.target={target}"
    units = [str(u) for u in units]
    problems = []
    modules = dict(model.named_modules())
    top = ", ".join(n for n, _ in model.named_children())
    missing = [p for p in [*units, head] if p not in modules or not p]
    if missing:
        problems.append(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a module "
                        f"of it (its top-level modules: {top})")
    elif not isinstance(modules[head], nn.Linear):
        problems.append(f"backbone.head={head} is a {type(modules[head]).__name__}, not the "
                        "nn.Linear classifier")
    if len(set(units)) != len(units):
        problems.append("a unit is listed twice")
    overlaps = [(a, b) for a in [*units, head] for b in [*units, head]
                if a != b and b.startswith(a + ".")]
    if overlaps:
        problems.append("units overlap: " + ", ".join(f"{b} is inside {a}" for a, b in overlaps))
    if not units:
        problems.append("backbone.units is empty")
    if problems:
        raise UserError(f"backbone.units / backbone.head do not fit {what}: "
                        + "; ".join(problems) + ".")
    parts = split(model, [Group(u, [u]) for u in units], head, what=what, strict=True)
    return Parts(parts.units, parts.unit_names, modules[head].in_features, parts.head_dropout, head)
