"""The only module where annotation keys are spelled.

Analysis passes write typed records into ``node.meta`` (per node) or ``graph_module.meta``
(per graph); later passes read them back through the same key object, so a missing annotation
fails with a message that names the node and the pass to run, never with a bare ``KeyError``.

>>> import torch
>>> from pqcompile import trace
>>> from pqcompile.passes import ShapeAnalysis
>>> gm = trace(torch.nn.Linear(4, 2), (torch.randn(1, 4),))
>>> gm = ShapeAnalysis()(gm).graph_module
>>> [tuple(SHAPE.get(n).shape) for n in gm.graph.nodes if n.op == "call_module"]
[(1, 2)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch.fx

from .errors import MissingAnnotationError

T = TypeVar("T")

_ALL_KEYS: dict[str, "MetaKey[Any]"] = {}


@dataclass(frozen=True)
class MetaKey(Generic[T]):
    """A typed annotation key.

    ``scope`` is ``"node"`` (stored in ``node.meta``) or ``"graph"`` (stored in
    ``GraphModule.meta``). ``provided_by`` names the pass that writes it, for error messages.
    """

    name: str
    provided_by: str
    doc: str
    scope: str = "node"

    def __post_init__(self) -> None:
        if self.scope not in ("node", "graph"):
            raise ValueError(f"MetaKey {self.name!r}: scope must be 'node' or 'graph'")
        _ALL_KEYS[self.name] = self

    def _store(self, owner: Any) -> dict:
        if self.scope == "node":
            if not isinstance(owner, torch.fx.Node):
                raise TypeError(f"{self.name} is a node annotation; pass a torch.fx.Node")
            return owner.meta
        if not isinstance(owner, torch.fx.GraphModule):
            raise TypeError(f"{self.name} is a graph annotation; pass a torch.fx.GraphModule")
        return owner.meta

    def has(self, owner: Any) -> bool:
        return self.name in self._store(owner)

    def get(self, owner: Any) -> T:
        store = self._store(owner)
        if self.name not in store:
            where = f"node {owner.name!r} ({owner.op} {owner.target})" if self.scope == "node" \
                else "the graph module"
            raise MissingAnnotationError(
                f"{where} has no {self.name} annotation: run {self.provided_by} first "
                f"({self.doc})")
        return store[self.name]

    def find(self, owner: Any, default: T | None = None) -> T | None:
        return self._store(owner).get(self.name, default)

    def set(self, owner: Any, value: T) -> None:
        self._store(owner)[self.name] = value

    def clear(self, owner: Any) -> None:
        self._store(owner).pop(self.name, None)

    def __repr__(self) -> str:
        return f"MetaKey({self.name!r})"


def all_keys() -> dict[str, MetaKey[Any]]:
    """Every annotation key defined so far, by name."""
    return dict(_ALL_KEYS)


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BitWidths:
    """Bits of one layer: ``weight == 0`` is never used for a layer (pruning is per group)."""

    weight: int = 32
    activation: int = 32

    def __post_init__(self) -> None:
        for what, b in (("weight", self.weight), ("activation", self.activation)):
            if not isinstance(b, int) or not 1 <= b <= 32:
                raise ValueError(f"BitWidths.{what} must be an int in 1..32, got {b!r}")


@dataclass(frozen=True)
class NodeCost:
    """Cost of one node at its bit widths.

    ``macs`` counts multiply-accumulates of conv, linear and matmul-like nodes (0 elsewhere);
    ``bops = macs * weight_bits * activation_bits`` (for matmul of two activations, both
    operands count as activations); ``weight_bytes`` is the storage of the node's weights at
    ``weight_bits`` (biases at 32 bits).
    """

    macs: int
    params: int
    weight_bits: int
    activation_bits: int
    bops: int
    weight_bytes: float


@dataclass(frozen=True)
class CostTotals:
    """Sums over the graph, and the FP32 reference (``macs * 32 * 32``)."""

    macs: int
    params: int
    bops: int
    weight_bytes: float
    fp32_bops: int
    fp32_weight_bytes: float

    @property
    def bop_reduction(self) -> float:
        return self.fp32_bops / self.bops if self.bops else float("inf")


@dataclass
class ExampleInputs:
    """The tensors the graph was traced and shape-propagated with."""

    args: tuple = field(default_factory=tuple)


# --- keys ------------------------------------------------------------------------------------

EXAMPLE_INPUTS: MetaKey[ExampleInputs] = MetaKey(
    "pqc.example_inputs", "pqcompile.trace", "the example inputs given at trace time", "graph")

SOURCE_MODEL: MetaKey[str] = MetaKey(
    "pqc.source_model", "pqcompile.trace", "class name of the traced model", "graph")

# fx's own key, so the records interoperate with torch.fx tooling (ShapeProp writes it).
SHAPE: MetaKey[Any] = MetaKey(
    "tensor_meta", "ShapeAnalysis", "shape and dtype of the node's output")

BITS: MetaKey[BitWidths] = MetaKey(
    "pqc.bits", "a solver or set_bits", "weight and activation bit widths of a layer")

COST: MetaKey[NodeCost] = MetaKey(
    "pqc.cost", "CostAnalysis", "MACs, params, BOPs and bytes of the node")

COST_TOTALS: MetaKey[CostTotals] = MetaKey(
    "pqc.cost_totals", "CostAnalysis", "graph totals of MACs, BOPs and bytes", "graph")


# --- layer discovery ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscoveredLayer:
    """A layer made by layer discovery: the ``call_module`` ``node`` of ``module`` (a path in
    the graph module), from ``source`` (what the traced graph computed there)."""

    node: str
    module: str
    source: str


@dataclass(frozen=True)
class LayerDiscovery:
    """What layer discovery did at trace time: the ``layers`` it made, and ``no_bits``: node
    name -> why a conv/linear-like node could not become a layer (it runs in float)."""

    layers: tuple[DiscoveredLayer, ...] = ()
    no_bits: dict[str, str] = field(default_factory=dict)


LAYER_DISCOVERY: MetaKey[LayerDiscovery] = MetaKey(
    "pqc.layer_discovery", "pqcompile.trace (passes.layer_discovery)",
    "layers found by what nodes compute, and why others run in float", "graph")


# --- channel groups ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ChannelMember:
    """Where the channels of a :class:`ChannelGroup` live in one node.

    ``role`` is ``"out"`` (a conv/linear output: rows of its weight), ``"in"`` (a conv/linear
    input: its weight's input columns; ``dim`` is then a dim of the node's *input*) or
    ``"pass"`` (any other node carrying the channels: BN, activations, adds, views, ...).
    ``dim`` is the dim of the tensor the channels lie along, or a tuple of dims when a view
    spreads them over several (``index`` then holds row-major flat positions over those dims).
    ``index[i]`` lists the positions owned by channel ``i`` of the group: one for a plain
    channel, several after a flatten (``H*W`` features per channel) or a depthwise multiplier.
    ``module`` is the module path of a ``call_module`` node, so the original model can be edited.
    """

    node: str
    role: str
    dim: Any
    index: Any
    module: str | None = None


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Channels that must be removed together: one keep/prune decision per channel of the group.

    ``size`` channels, each owning ``members[j].index[i]`` positions in member ``j``.
    ``prunable`` is False when removing any of them would change what the model computes in a
    way pruning cannot repair; ``reason`` then says why and names the node and op.
    """

    id: int
    name: str
    size: int
    members: tuple[ChannelMember, ...]
    prunable: bool
    reason: str | None = None

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.node for m in self.members))

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"unprunable: {self.reason}"
        return f"ChannelGroup({self.id}, {self.name!r}, size={self.size}, {state})"


@dataclass(frozen=True)
class NodeChannels:
    """The channel layout of one node and the groups governing it.

    ``dims``: dims of the output the channels lie along (``()``: no prunable channels);
    ``shrink_dim``: the dim whose size drops when channels are removed; ``out_groups`` and
    ``in_groups``: ids of the groups governing the output and the input channels (for a
    conv/linear: its weight's input columns, along ``in_dim`` of its input).
    """

    dims: tuple[int, ...] = ()
    shrink_dim: int | None = None
    out_groups: tuple[int, ...] = ()
    in_groups: tuple[int, ...] = ()
    in_dim: int | None = None


@dataclass(frozen=True, eq=False)
class KeptChannels:
    """After pruning: original positions kept along ``dim`` of a node's output."""

    dim: int
    indices: Any
    original_size: int


CHANNEL_GROUPS: MetaKey[tuple[ChannelGroup, ...]] = MetaKey(
    "pqc.channel_groups", "ChannelGroupAnalysis",
    "channels that must be pruned together, in a deterministic order", "graph")

NODE_CHANNELS: MetaKey[NodeChannels] = MetaKey(
    "pqc.node_channels", "ChannelGroupAnalysis",
    "channel dims of the node's output and the groups governing its output and input")

KEPT_CHANNELS: MetaKey[KeptChannels] = MetaKey(
    "pqc.kept_channels", "PruneChannels", "original channel positions kept by pruning")


# --- quantization ------------------------------------------------------------------------------


@dataclass(frozen=True)
class QParams:
    """How one activation tensor is stored as integers: ``value = q * scale``, zero point 0.

    ``signed``: symmetric narrow range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``; unsigned:
    ``[0, 2^b - 1]`` (tensors known to be non-negative). Tensors of up to 8 bits are stored
    as ``int8`` / ``uint8``; 9 to 16 bits (a residual sum read by float ops only, see
    ``build_reference(residual_bits=...)``) as ``int16`` / ``uint16``.
    """

    scale: float
    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"QParams.bits must be in 2..16, got {self.bits}")
        if not self.scale > 0:
            raise ValueError(f"QParams.scale must be positive, got {self.scale}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    @property
    def dtype(self) -> str:
        width = 8 if self.bits <= 8 else 16
        return f"int{width}" if self.signed else f"uint{width}"


@dataclass(frozen=True)
class WeightQuant:
    """Per-output-channel symmetric weights: ``w[c] ~ q[c] * scales[c]``, narrow range."""

    bits: int
    scales: tuple[float, ...]


@dataclass(frozen=True)
class FixedPoint:
    """A real multiplier ``M ~ mult * 2^-shift`` (``mult`` < 2^31), per channel or one value."""

    mult: tuple[int, ...]
    shift: tuple[int, ...]


@dataclass(frozen=True)
class Requant:
    """How an integer op maps its accumulator to its output tensor.

    One :class:`FixedPoint` per input of the op (conv/linear/pool: one; add: one per operand,
    sharing one shift; concat: one per input, ``None`` where the input is copied unchanged);
    the result is clamped to ``[lo, hi]`` (the output range, narrowed by a folded ReLU/ReLU6).
    """

    inputs: tuple[FixedPoint | None, ...]
    lo: int
    hi: int


@dataclass(frozen=True)
class FloatOp:
    """An op with no integer lowering: it runs in float between a dequantize and a quantize.

    ``precision`` is ``"float64"``, or ``"float32"`` for a module whose code cannot be traced.
    """

    node: str
    op: str
    precision: str = "float64"


FOLDED_BN: MetaKey[str] = MetaKey(
    "pqc.folded_bn", "FoldBatchNorm", "name of the batch-norm node folded into this layer")

QPARAMS: MetaKey[QParams] = MetaKey(
    "pqc.qparams", "build_reference", "scale, bits and signedness of the node's output tensor")

WEIGHT_QUANT: MetaKey[WeightQuant] = MetaKey(
    "pqc.weight_quant", "build_reference", "bits and per-channel scales of the layer's weight")

REQUANT: MetaKey[Requant] = MetaKey(
    "pqc.requant", "build_reference", "fixed-point multipliers and clamp bounds of an integer op")

EMBEDDING_BITS: MetaKey[int] = MetaKey(
    "pqc.embedding_bits", "pqcompile.quant.tables.set_table_bits",
    "bits an nn.Embedding table is stored at (8, or 4/2: packed rows, a multiplier per row)")

FUSED_ACTIVATION: MetaKey[str] = MetaKey(
    "pqc.fused_activation", "build_reference", "name of the ReLU/ReLU6 node folded into the clamp")

FLOAT_OPS: MetaKey[tuple[FloatOp, ...]] = MetaKey(
    "pqc.float_ops", "build_reference", "ops that run in float in the quantized program", "graph")


# --- sensitivity -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SensitivityInfo:
    """How the ``SENSITIVITY`` and ``CHANNEL_IMPORTANCE`` annotations were computed.

    ``units`` of the layer and of the channel criterion (equal when they trade off on one
    scale); ``bit_options``: the ``(weight bits, activation bits)`` pairs scored; ``data``:
    whether calibration data was used.
    """

    criterion: str
    channel_criterion: str | None
    units: str
    channel_units: str | None
    bit_options: tuple[tuple[int, int], ...]
    data: bool


SENSITIVITY: MetaKey[dict[tuple[int, int], float]] = MetaKey(
    "pqc.sensitivity", "SensitivityAnalysis",
    "cost of each (weight bits, activation bits) option of a conv/linear layer, >= 0")

CHANNEL_IMPORTANCE: MetaKey[dict[int, Any]] = MetaKey(
    "pqc.channel_importance", "SensitivityAnalysis",
    "per-channel prune sensitivity (a float64 array) of every prunable group, by group id",
    "graph")

SENSITIVITY_INFO: MetaKey[SensitivityInfo] = MetaKey(
    "pqc.sensitivity_info", "SensitivityAnalysis",
    "criteria, units and bit options behind the sensitivity annotations", "graph")


# --- compile pipeline ----------------------------------------------------------------------------

KEEP_MASKS: MetaKey[dict[int, Any]] = MetaKey(
    "pqc.keep_masks", "the compile pipeline's solve stage",
    "the solver's keep-mask (1-D bool array, True = keep) of each channel group it prunes, by "
    "group id; with the layers' pqc.bits, the assignment the later stages build", "graph")

REFERENCE: MetaKey[bool] = MetaKey(
    "pqc.integer_reference", "the compile pipeline's quantize stage",
    "the graph is the calibrated integer-exact reference the lowering takes", "graph")
