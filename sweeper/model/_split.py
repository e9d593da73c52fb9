"""Cutting any network's forward into freeze units with torch.fx: the mechanism behind every
backbone that is not one of the six hand-cut families (torchvision's other models, timm
models, a user's own module).

A kind says which modules (and loose parameters) make each unit, in forward order, and which
``nn.Linear`` is the classifier; :func:`split` traces the forward with those modules as
opaque leaves, finds the value the classifier reads (the pooled feature vector), and cuts the
traced graph into one :class:`GraphUnit` per unit. A unit is a ``GraphModule`` over the
network's own submodules (shared, not copied: loading weights into the network loads them
into the units), so the units composed are the network's forward up to its feature vector,
and the classifier is what a new head replaces.

Where the cuts go:

- between two consecutive units, at the last point before the next unit's first module where
  exactly one tensor crosses: the code between them (an activation, a reshape) goes with the
  unit before;
- operations before the first unit form a ``stem`` unit when they hold parameters (else they
  join the first unit); operations after the last unit (pooling, flatten, a final norm) join
  it; a dropout right in front of the classifier goes with the new head;
- with ``strict`` (the user's own units) anything else is an error that names the unit:
  a module with parameters outside every unit, units that interleave or are listed out of
  forward order, a unit not on the way to the classifier, more than one tensor flowing from a
  unit into later ones (a skip connection around a cut). Without it (units derived from a
  library's structure) such units are merged instead.

Code outside the units that depends on train/eval mode is traced in both modes; a unit then
runs the graph of its current mode (as torchvision's feature extraction does).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from sweeper.errors import UserError


@dataclass
class Group:
    """What one freeze unit owns: module paths and loose parameter names (e.g. a class token)."""

    name: str
    modules: list[str]
    params: list[str] = field(default_factory=list)


@dataclass
class Split:
    units: list[nn.Module]
    unit_names: list[str]
    head_dropout: float


class GraphUnit(fx.GraphModule):
    """A freeze unit cut from a traced forward; its code is part of its ``repr`` (and so of the
    feature cache's key, :mod:`sweeper.feeds`)."""

    def extra_repr(self) -> str:
        return self.code.strip()


class DualUnit(nn.Module):
    """A unit whose surrounding code differs in train and eval mode: one graph per mode."""

    def __init__(self, train_graph: GraphUnit, eval_graph: GraphUnit) -> None:
        super().__init__()
        self.train_graph = train_graph
        self.eval_graph = eval_graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.train_graph if self.training else self.eval_graph)(x)


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str], leaf_types: tuple[type, ...],
                 autowrap_functions: tuple[Callable, ...]) -> None:
        super().__init__(autowrap_functions=autowrap_functions)
        self.leaves = leaves
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.leaves or isinstance(m, self.leaf_types)
                or super().is_leaf_module(m, qualname))


def trace(root: nn.Module, leaves: set[str], what: str, leaf_types: Iterable[type] = (),
          autowrap_functions: Iterable[Callable] = (), training: bool = False) -> fx.Graph:
    """``root``'s forward as an fx graph in train or eval mode, ``leaves`` kept opaque."""
    was = root.training
    root.train(training)
    tracer = _Tracer(leaves, tuple(leaf_types), tuple(autowrap_functions))
    # Optional arguments after the input (e.g. an attention mask) keep their defaults.
    params = list(inspect.signature(root.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    try:
        return tracer.trace(root, concrete_args=concrete or None)
    except Exception as e:  # noqa: BLE001 - any tracing failure is reported the same way
        raise UserError(
            f"Could not trace the forward of {what} with torch.fx to cut it into freeze units "
            f"({type(e).__name__}: {e}). Data-dependent Python control flow outside the units "
            "cannot be traced: move it inside a unit's module."
        ) from None
    finally:
        root.train(was)


def _owner(path: str, owners: dict[str, int]) -> int | None:
    while True:
        if path in owners:
            return owners[path]
        if "." not in path:
            return None
        path = path.rsplit(".", 1)[0]


def _join_names(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common) if common else "+".join(names)


@dataclass
class _Plan:
    """Where the cuts of one traced graph go."""

    nodes: list[fx.Node]  # the forward up to the feature vector, in order (placeholder first)
    features: fx.Node
    head_dropout: float
    cuts: list[int]  # index into nodes of the last node of every unit but the last
    outs: list[fx.Node]  # the one value crossing each cut: what that unit returns
    names: list[str]


def _plan(root: nn.Module, graph: fx.Graph, groups: list[Group], head: str, strict: bool,
          what: str) -> _Plan:
    all_nodes = list(graph.nodes)
    calls = [n for n in all_nodes if n.op == "call_module" and n.target == head]
    if len(calls) != 1:
        raise UserError(f"The classifier {head!r} of {what} is called {len(calls)} times in its "
                        "forward; it must be called once, on the feature vector.")
    features = calls[0].args[0]
    if not isinstance(features, fx.Node):
        raise UserError(f"The classifier {head!r} of {what} does not read a tensor.")
    head_dropout = 0.0
    if features.op == "call_module" and len(features.users) == 1:
        module = root.get_submodule(str(features.target))
        if isinstance(module, nn.Dropout):
            head_dropout = float(module.p)
            features = features.args[0]

    # The forward up to the feature vector: what it depends on, in graph order.
    needed: set[fx.Node] = set()
    stack = [features]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    nodes = [n for n in all_nodes if n in needed]
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1 or nodes[0] is not inputs[0]:
        raise UserError(f"The forward of {what} must take one input tensor before its classifier.")
    index = {n: i for i, n in enumerate(nodes)}

    owners: dict[str, int] = {}
    for g, group in enumerate(groups):
        for path in [*group.modules, *group.params]:
            owners[path] = g

    def uses_params(n: fx.Node) -> bool:
        if n.op == "call_module":
            return any(True for _ in root.get_submodule(str(n.target)).parameters())
        if n.op == "get_attr":
            return isinstance(_attr(root, str(n.target)), nn.Parameter)
        return False

    owner: dict[int, int | None] = {}
    uncovered: list[str] = []
    for i, n in enumerate(nodes):
        owner[i] = _owner(str(n.target), owners) if n.op in ("call_module", "get_attr") else None
        if owner[i] is None and uses_params(n):
            uncovered.append(str(n.target))
    names = [g.name for g in groups]
    present = sorted({g for g in owner.values() if g is not None})
    problems = []
    if strict:
        if uncovered:
            problems.append("runs modules with parameters outside every unit: "
                            f"{', '.join(dict.fromkeys(uncovered))} (add them to a unit)")
        missing = [names[g] for g in range(len(groups)) if g not in present]
        if missing:
            problems.append(f"never reaches units {', '.join(missing)} on the way to the "
                            f"classifier {head!r}")

    # Every unit's span of nodes; spans must follow one another.
    spans: list[list[int]] = []  # [first, last, group...]
    for g in sorted(present, key=lambda g: min(i for i, o in owner.items() if o == g)):
        idx = [i for i, o in owner.items() if o == g]
        spans.append([min(idx), max(idx), g])
    if not strict and spans:
        first = spans[0][0]
        if any(owner[i] is None and uses_params(nodes[i]) for i in range(1, first)):
            spans.insert(0, [1, first - 1, -1])  # a stem of loose layers before the first unit
    order = [s[2] for s in spans]
    if strict and order != sorted(order):
        problems.append(f"runs the units in the order {', '.join(names[g] for g in order)}; "
                        "list them in forward order")
    merged: list[list[int]] = []
    for span in spans:
        if merged and span[0] <= merged[-1][1]:
            if strict:
                problems.append(f"interleaves units {names[merged[-1][-1]]} and {names[span[2]]} "
                                "(one runs inside the other): make them one unit")
            merged[-1][1] = max(merged[-1][1], span[1])
            merged[-1].append(span[2])
        else:
            merged.append(span)
    if problems:
        raise UserError(f"The units of {what} do not cut its forward into a chain: it "
                        + "; it ".join(problems) + ".")

    # Where a value is last read (the classifier reads the features after every node).
    last_use = {i: max((index[u] for u in n.users if u in index), default=-1)
                for i, n in enumerate(nodes)}
    last_use[index[features]] = len(nodes)

    def crossing(p: int) -> list[fx.Node]:
        return [nodes[i] for i in range(p + 1) if nodes[i].op != "get_attr" and last_use[i] > p]

    def label(span: list[int]) -> str:
        return _join_names(["stem" if g == -1 else names[g] for g in span[2:]])

    cuts: list[int] = []
    outs: list[fx.Node] = []
    labels: list[str] = []
    current = merged[0] if merged else None
    for nxt in merged[1:]:
        cut = next((p for p in range(nxt[0] - 1, current[1] - 1, -1) if len(crossing(p)) == 1), None)
        if cut is None:
            if strict:
                values = ", ".join(str(n.target) if n.op != "placeholder" else "the input"
                                   for n in crossing(current[1]))
                raise UserError(
                    f"The units of {what} do not cut its forward into a chain: more than one "
                    f"tensor flows from unit {label(current)} into later units (the outputs of "
                    f"{values}), as "
                    f"with a skip connection around the cut: merge {label(current)} with the "
                    "unit after it.")
            current = [current[0], nxt[1], *current[2:], *nxt[2:]]
            continue
        cuts.append(cut)
        outs.append(crossing(cut)[0])
        labels.append(label(current))
        current = nxt
    if current is not None:
        labels.append(label(current))
    else:
        labels.append("features")
    return _Plan(nodes, features, head_dropout, cuts, outs, labels)


def _attr(root: nn.Module, target: str):
    module, _, name = target.rpartition(".")
    return getattr(root.get_submodule(module) if module else root, name)


def _segments(root: nn.Module, plan: _Plan) -> list[GraphUnit]:
    nodes = plan.nodes
    bounds = [0, *(c + 1 for c in plan.cuts), len(nodes)]
    entry = nodes[0]  # the input placeholder, then each cut's crossing value
    units = []
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {entry: graph.placeholder("x")}

        def arg(n: fx.Node, graph: fx.Graph = graph, env: dict = env) -> fx.Node:
            if n not in env:
                if n.op != "get_attr":
                    raise RuntimeError(f"cut crosses {n}")  # ruled out by the plan
                env[n] = graph.get_attr(str(n.target))
            return env[n]

        for n in nodes[lo:hi]:
            if n.op in ("placeholder", "get_attr"):
                continue
            env[n] = graph.node_copy(n, arg)
        out = plan.outs[k] if k < len(plan.outs) else plan.features
        graph.output(arg(out))
        units.append(GraphUnit(root, graph, class_name="GraphUnit"))
        entry = out
    return units


def split(root: nn.Module, groups: list[Group], head: str, *, what: str, strict: bool = False,
          leaf_types: Iterable[type] = (), autowrap_functions: Iterable[Callable] = ()) -> Split:
    """Cut ``root``'s forward into units owning ``groups`` (in forward order), up to the
    input of its classifier ``head``; see the module docstring for the rules."""
    leaves = {head, *(m for g in groups for m in g.modules)}
    leaf_types, autowrap_functions = tuple(leaf_types), tuple(autowrap_functions)
    graphs = [trace(root, leaves, what, leaf_types, autowrap_functions, training=mode)
              for mode in (False, True)]
    plans = [_plan(root, g, groups, head, strict, what) for g in graphs]
    units = _segments(root, plans[0])
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        train_units = _segments(root, plans[1])
        if plans[1].names != plans[0].names:
            raise UserError(f"The forward of {what} changes its structure between train and eval "
                            "mode outside its units; it cannot be cut into freeze units.")
        units = [DualUnit(t, e) for t, e in zip(train_units, units, strict=True)]
    _check_ownership(units, plans[0].names, what)
    return Split(units, plans[0].names, plans[0].head_dropout)


def _check_ownership(units: list[nn.Module], names: list[str], what: str) -> None:
    seen: dict[int, str] = {}
    for unit, name in zip(units, names, strict=True):
        for p in unit.parameters():
            if id(p) in seen and seen[id(p)] != name:
                raise UserError(f"Units {seen[id(p)]} and {name} of {what} share parameters; a "
                                "parameter must belong to one unit.")
            seen[id(p)] = name
