"""The records annotations hold (:mod:`pqcompile.meta` spells the keys): bit widths, costs,
example inputs, discovered layers, channel groups, quantization parameters and how the
sensitivities were computed. Plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# --- costs and inputs -------------------------------------------------------------------------


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
