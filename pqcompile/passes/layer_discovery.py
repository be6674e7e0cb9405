"""Layer discovery: conv and linear layers found by what a node computes, not by module type.

Every later pass (channel groups, pruning, quantization, lowering) recognizes a layer as a
``call_module`` node of an ``nn.Conv2d`` or ``nn.Linear``. Real checkpoints compute layers in
other ways: a TF-style ``Conv2dStaticSamePadding(nn.Conv2d)`` overrides ``forward`` with
``F.pad`` and ``F.conv2d(x, self.weight, ...)``, so fx traces it into a functional call on
``get_attr`` parameters; models call ``F.linear`` on their own parameters; ``nn.Conv1d`` has
no integer kernel of its own. :func:`discover_layers` rewrites, in a traced graph it owns:

* ``F.conv2d`` / ``F.linear`` whose weight (and bias) are parameters read directly, with
  constant stride, padding, dilation and groups, into a ``call_module`` of an ``nn.Conv2d`` /
  ``nn.Linear`` that holds those same ``nn.Parameter`` objects (nothing is copied; calls that
  share a weight and its arguments share one module). The module takes the parameters' module
  path (``stem`` for ``stem.weight``), so the user's names stay in reports and errors. A pad
  before it stays a node of its own.
* ``nn.Conv1d`` and ``F.conv1d`` on parameters into an ``nn.Conv2d`` with a ``1 x K`` kernel
  between ``unsqueeze(2)`` and ``squeeze(2)``; a ``BatchNorm1d`` and elementwise activations
  that follow it move inside (as a ``BatchNorm2d`` on the same parameters), so the conv-BN-ReLU
  pattern folds and fuses as in 2-d, and consecutive 1-d convs share one unsqueeze.
* a *leaf* (``leaf_modules=``) that subclasses ``nn.Conv2d``/``nn.Linear`` but overrides what
  they compute into an :class:`OpaqueLeaf`, so no pass mistakes it for the plain layer (it
  runs in float, as a leaf should).

What cannot become a layer (a weight computed in ``forward``, a weight that other nodes also
read, ``nn.ConvTranspose2d``, 3-d convs, ...) stays as traced and runs in float; the reason
is recorded (``meta.LAYER_DISCOVERY``) and :func:`why_no_bits` states it where that matters,
e.g. in the solver's error for a budget these float MACs make unreachable. The modules it
makes are built in :mod:`pqcompile.passes.layer_modules`.

>>> import torch
>>> import torch.nn.functional as F
>>> class Same(torch.nn.Conv2d):
...     def forward(self, x):
...         return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride)
>>> m = torch.nn.Sequential(Same(3, 8, 2), torch.nn.ReLU())
>>> gm = torch.fx.symbolic_trace(m)
>>> [r.node for r in discover_layers(gm)]
['_0']
>>> [(n.op, n.name) for n in gm.graph.nodes]
[('placeholder', 'input_1'), ('call_function', 'pad'), ('call_module', '_0'), \
('call_module', '_1'), ('output', 'output')]
>>> gm.get_submodule("0").weight is m[0].weight
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..meta import LAYER_DISCOVERY, DiscoveredLayer, LayerDiscovery
from .layer_modules import OpaqueLeaf, batchnorm2d_like, computes_as_base, conv2d_like
from .opinfo import classify

_CONV_FN = {torch.conv1d: 1, torch.conv2d: 2}  # functional conv -> spatial dims
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)
_LINEAR_ARGS = ("input", "weight", "bias")
_NO_LOWERING = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Conv3d)


def discover_layers(gm: torch.fx.GraphModule,
                    example_inputs: Sequence[torch.Tensor] | None = None) -> list[DiscoveredLayer]:
    """Rewrite ``gm`` in place (see the module doc); returns the layers made. ``gm`` must be a
    graph module pqcompile owns (its submodules may be replaced). ``example_inputs`` give the
    rank of 1-d convs' inputs (without them, every 1-d conv input is taken as batched)."""
    state = _State(gm)
    ranks = _input_ranks(gm, example_inputs) if example_inputs is not None else {}
    for n in list(gm.graph.nodes):
        if n.op == "call_module":
            state.module_node(n, ranks)
        elif n.op == "call_function" and (n.target in _CONV_FN or n.target is F.linear):
            state.functional_node(n, ranks)
    state.finish()
    LAYER_DISCOVERY.set(gm, LayerDiscovery(tuple(state.found), dict(state.reasons)))
    return state.found


class _State:
    """The rewrite of one graph: modules made so far, squeezes to cancel, reasons."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm, self.graph = gm, gm.graph
        self.found: list[DiscoveredLayer] = []
        self.reasons: dict[str, str] = {}
        self.made: dict[tuple, str] = {}   # (weight attr, bias attr, arguments) -> module path
        self.squeezes: set[torch.fx.Node] = set()
        self.consumed: set[str] = set()   # get_attr targets now read by made modules
        self.called: dict[int, str] = {}  # parameters of called modules -> a module path
        for n in self.graph.nodes:
            if n.op == "call_module":
                for p in gm.get_submodule(n.target).parameters():
                    self.called.setdefault(id(p), n.target)

    # --- call_module nodes -------------------------------------------------------------------

    def module_node(self, n: torch.fx.Node, ranks: dict[str, int]) -> None:
        m = self.gm.get_submodule(n.target)
        if not computes_as_base(m):
            self._set_module(n.target, OpaqueLeaf(m))
            self.reasons[n.name] = (f"leaf module {n.target!r}, a {type(m).__name__} whose "
                                    "forward differs from its base layer's, runs in float as "
                                    "a leaf: drop it from leaf_modules to trace it into a layer")
            return
        if isinstance(m, _NO_LOWERING):
            self.reasons[n.name] = f"{type(m).__name__} has no integer lowering, so it runs " \
                "in float" + (", an Upsample and a Conv2d would get bits"
                              if isinstance(m, nn.ConvTranspose2d) else "")
            return
        if not isinstance(m, nn.Conv1d):
            return
        why = self._conv1d_obstacle(n, m.padding_mode, ranks)
        if why is None and sum(1 for u in self.graph.nodes
                               if u.op == "call_module" and u.target == n.target) > 1:
            why = "its module is also called elsewhere"
        if why is not None:
            self.reasons[n.name] = f"Conv1d {why} runs in float"
            return
        conv = conv2d_like(m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, 1)
        self._set_module(n.target, conv)
        x = n.args[0] if n.args else n.kwargs["input"]
        n.args, n.kwargs = (self._unsqueeze(x, n),), {}
        self._squeeze_after(n)
        self.found.append(DiscoveredLayer(n.name, n.target, "nn.Conv1d (as a 1xK Conv2d)"))

    def _conv1d_obstacle(self, n, padding_mode: str, ranks: dict[str, int]) -> str | None:
        if padding_mode != "zeros":
            return f"with padding_mode {padding_mode!r}"
        if ranks.get(n.name, 3) != 3:
            return "on an unbatched input"
        return None

    # --- functional conv / linear -------------------------------------------------------------

    def functional_node(self, n: torch.fx.Node, ranks: dict[str, int]) -> None:
        nd = _CONV_FN.get(n.target)
        names, defaults = (_CONV_ARGS, _CONV_DEFAULTS) if nd else (_LINEAR_ARGS, (None,) * 3)
        op = {1: "conv1d", 2: "conv2d"}.get(nd, "linear")
        args = _bind(n, names, defaults)
        if args is None:
            self.reasons[n.name] = f"{op} with arguments pqcompile cannot read runs in float"
            return
        why = self._functional_obstacle(n, op, args, nd)
        if why is None and nd == 1:
            why = self._conv1d_obstacle(n, "zeros", ranks)
        if why is not None:
            self.reasons[n.name] = f"{op} {why}, so it runs in float"
            return
        w_node, b_node = args["weight"], args["bias"]
        weight, bias = _attr(self.gm, w_node), _attr(self.gm, b_node) if b_node else None
        key = (w_node.target, getattr(b_node, "target", None),
               *(repr(args[k]) for k in names[3:]))
        path = self.made.get(key)
        if path is None:
            if nd:
                module = conv2d_like(weight, bias, args["stride"], args["padding"],
                                      args["dilation"], args["groups"], nd)
            else:
                module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                   device="meta")
                module.weight, module.bias = weight, bias
            path = self._place(w_node.target, b_node, module, op)
            self.made[key] = path
        x = args["input"]
        with self.graph.inserting_before(n):
            new = self.graph.create_node(
                "call_module", path, (self._unsqueeze(x, n) if nd == 1 else x,), {})
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        self.graph.erase_node(n)
        if nd == 1:
            self._squeeze_after(new)
        what = "F.linear" if op == "linear" else f"F.{op}"
        self.found.append(DiscoveredLayer(new.name, path, f"{what} on parameter {w_node.target!r}"))

    def _functional_obstacle(self, n, op: str, args: dict, nd: int | None) -> str | None:
        """Why this functional call cannot become a layer module (``None``: it can)."""
        w_node, b_node = args["weight"], args["bias"]
        if not isinstance(args["input"], torch.fx.Node):
            return "on a constant input"
        weight = _attr(self.gm, w_node)
        if not isinstance(weight, nn.Parameter):
            source = f"node {w_node.name!r}" if isinstance(w_node, torch.fx.Node) else "a value"
            return (f"whose weight is computed in forward() by {source}, not read from a "
                    "parameter (compute it once in __init__ to give the layer bits)")
        want = 2 if nd is None else nd + 2
        if weight.dim() != want:
            return f"whose weight has {weight.dim()} dims, not {want}"
        if b_node is not None:
            bias = _attr(self.gm, b_node)
            if not isinstance(bias, nn.Parameter) or tuple(bias.shape) != (weight.shape[0],):
                return "whose bias is computed in forward() or has another shape"
        for k in ("stride", "padding", "dilation", "groups"):
            if k in args and _has_node(args[k]):
                return f"whose {k} is computed in forward()"
        for attr in (w_node, b_node):
            if attr is None:
                continue
            if id(_attr(self.gm, attr)) in self.called:
                return (f"whose parameter {attr.target!r} is also used by module "
                        f"{self.called[id(_attr(self.gm, attr))]!r}")
            others = [u for u in attr.users if u.op != "call_function" or u.target != n.target
                      or _bind(u, _CONV_ARGS if nd else _LINEAR_ARGS,
                               _CONV_DEFAULTS if nd else (None,) * 3) is None]
            if others:
                return (f"whose parameter {attr.target!r} is also read by node "
                        f"{others[0].name!r}")
        if nd:
            try:
                conv2d_like(weight, None, args["stride"], args["padding"], args["dilation"],
                             args["groups"], nd)
            except (TypeError, ValueError, RuntimeError) as exc:
                return f"with arguments nn.Conv2d does not take ({exc})"
        return None

    # --- graph and module helpers --------------------------------------------------------------

    def _unsqueeze(self, x: torch.fx.Node, before: torch.fx.Node) -> torch.fx.Node:
        """``x`` with a unit height dim: the input of a 1-d conv's squeeze, if it is one."""
        if x in self.squeezes and len(x.users) == 1:
            return x.args[0]
        with self.graph.inserting_before(before):
            return self.graph.call_method("unsqueeze", (x, 2))

    def _squeeze_after(self, conv: torch.fx.Node) -> None:
        """Insert ``squeeze(2)`` after the conv, past a BatchNorm1d and elementwise
        activations that are its only readers (they compute the same on the 4-d tensor)."""
        tail = conv
        while len(tail.users) == 1:
            u = next(iter(tail.users))
            if not self._moves_inside(u, tail):
                break
            tail = u
        users = list(tail.users)
        with self.graph.inserting_after(tail):
            sq = self.graph.call_method("squeeze", (tail, 2))
        for u in users:
            u.replace_input_with(tail, sq)
        self.squeezes.add(sq)

    def _moves_inside(self, u: torch.fx.Node, tail: torch.fx.Node) -> bool:
        if u.all_input_nodes != [tail] or (u.args[:1] != (tail,)):
            return False
        if u.op == "call_module":
            m = self.gm.get_submodule(u.target)
            calls = sum(1 for v in self.graph.nodes if v.op == "call_module"
                        and v.target == u.target)
            if type(m) is nn.BatchNorm1d and calls == 1 and len(u.args) == 1 and not u.kwargs:
                self._set_module(u.target, batchnorm2d_like(m))
                return True
        return classify(self.gm, u).kind == "unary"

    def _set_module(self, path: str, module: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, name, module)

    def _place(self, weight_target: str, b_node, module: nn.Module, op: str) -> str:
        """A path for the new module, after its parameters' owner: the owner itself when it
        is a container fx made that holds nothing else, else a child of it named after the
        weight and ``op`` (``stem.conv2d`` for ``stem.weight``, ``proj_linear`` for a root
        parameter ``proj``)."""
        owner = weight_target.rpartition(".")[0]
        attrs = {weight_target} | ({b_node.target} if b_node is not None else set())
        self.consumed |= attrs
        container = self.gm.get_submodule(owner) if owner else None
        if container is not None and type(container) is nn.Module and \
                not any(n.op in ("call_module", "get_attr") and n.target == owner
                        for n in self.graph.nodes) and \
                not list(container.children()) and not list(container.buffers()) and \
                {f"{owner}.{k}" for k, _ in container.named_parameters()} <= attrs:
            self._set_module(owner, module)
            return owner
        attr = weight_target.rpartition(".")[2]
        name = op if attr == "weight" else f"{attr}_{op}"
        base = f"{owner}.{name}" if owner else name
        path, i = base, 1
        while _exists(self.gm, path):
            path, i = f"{base}_{i}", i + 1
        self._set_module(path, module)
        return path

    def finish(self) -> None:
        """Drop the squeezes, ``get_attr`` nodes and parameter attributes nothing reads any
        more."""
        for n in list(self.graph.nodes):
            if (n.op == "get_attr" or n in self.squeezes) and not n.users:
                self.graph.erase_node(n)
        read = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        for target in self.consumed - read:
            owner, _, name = target.rpartition(".")
            container = self.gm.get_submodule(owner) if owner else self.gm
            if owner not in self.made.values() and \
                    isinstance(getattr(container, name, None), nn.Parameter):
                delattr(container, name)
        self.graph.lint()
        self.gm.recompile()


def _bind(n: torch.fx.Node, names: Sequence[str], defaults: Sequence[Any]) -> dict | None:
    """The call's arguments by name (``None`` for unknown keywords or too many arguments)."""
    if len(n.args) > len(names) or set(n.kwargs) - set(names):
        return None
    out = dict(zip(names, defaults))
    out.update(zip(names, n.args))
    out.update(n.kwargs)
    return out if isinstance(out["weight"], torch.fx.Node) else None


def _attr(gm: torch.fx.GraphModule, node: Any) -> Any:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _exists(gm: torch.fx.GraphModule, path: str) -> bool:
    obj = gm
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _has_node(value: Any) -> bool:
    if isinstance(value, torch.fx.Node):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_node(v) for v in value)
    return False


def _input_ranks(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor]
                 ) -> dict[str, int]:
    """Rank of the input of every 1-d conv node, from a run on the example inputs."""
    wanted = {n for n in gm.graph.nodes if (n.op == "call_function" and n.target is torch.conv1d)
              or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv1d))}
    if not wanted:
        return {}
    ranks: dict[str, int] = {}

    class _Ranks(torch.fx.Interpreter):
        def run_node(self, n):
            if n in wanted:
                x = self.env.get(n.args[0]) if n.args else None
                if isinstance(x, torch.Tensor):
                    ranks[n.name] = x.dim()
            return super().run_node(n)

    with torch.no_grad():
        try:
            _Ranks(gm).run(*example_inputs)
        except Exception:  # noqa: BLE001 (the trace check reports a failing run by node)
            return {n.name: -1 for n in wanted}
    return ranks


def why_no_bits(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """Why a node with MACs is not a layer that gets bits (it runs in float)."""
    found = LAYER_DISCOVERY.find(gm)
    if found is not None and node.name in found.no_bits:
        return found.no_bits[node.name]
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return "it computes from constants only, no model input reaches it"
        if isinstance(m, OpaqueLeaf):
            m = m.module
        return f"{type(m).__name__} module has no integer lowering, so it runs in float"
    name = getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method" or name in ("matmul", "bmm", "mm"):
        return f"{name} of two activations runs in float"
    return f"{name} has no integer lowering, so it runs in float"
