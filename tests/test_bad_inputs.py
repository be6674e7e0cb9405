"""Bad-input catalog: every way of misusing pqcompile's public entry points, one case each.

Each case asserts

(a) the exact pqcompile exception type (each subclasses the built-in a caller expects, e.g.
    ``ValueError`` or ``TypeError``),
(b) a message that names the offending node / op / argument / file and says what to do, and
(c) where a model or data is passed in, that the caller's model (state_dict bitwise, training
    flags, module classes, parameters' ``requires_grad``) and data (every tensor of the loader
    or example inputs, every input array) are unchanged afterwards.

Cases marked ``xfail(strict=True)`` are known gaps, each with the reason; they start failing
(XPASS) when the gap is closed, so the marker is removed then.
"""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pqcompile
from pqcompile import Budget, ExampleInputError, TraceError, UnsupportedOpError
from pqcompile.runtime.artifact import FORMAT_VERSION, Artifact, ArtifactError
from pqcompile.budget import BudgetError, InfeasibleBudgetError
from pqcompile.errors import DataError, ModelError, NonFiniteWeightError, OptionError
from pqcompile.targets import ToolchainError, UnknownTargetError

BUDGET = Budget(bops="8x")
X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def tiny() -> nn.Sequential:
    """Two 3x3 convs (one with batch norm) and a linear head, for 1x3x8x8 inputs; train mode,
    as a caller's model often is."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 4))


def loader(n: int = 8, shape: tuple[int, ...] = (3, 8, 8), dtype=torch.float32) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(n, *shape, generator=g).to(dtype)
    return DataLoader(TensorDataset(inputs, torch.randint(0, 4, (n,), generator=g)),
                      batch_size=4)


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value
            return x * 2
        return -x


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.gate(torch.relu(self.conv(x))).mean((2, 3)))


class WithOp(nn.Module):
    """A conv, ``op`` on its activations, a linear head."""

    def __init__(self, op):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.op = op

    def forward(self, x):
        return self.fc(self.op(torch.relu(self.conv(x))).mean((2, 3)))


def _erfinv(y):
    return torch.erfinv(y.clamp(-0.5, 0.5))


def _sort(y):
    return y.sort(1).values


def _fft(y):
    return torch.fft.fft(y).real


# --- unchanged model and data ------------------------------------------------------------------

def _tensor_record(t: torch.Tensor) -> tuple:
    t = t.detach().cpu()
    return t.dtype, tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def snapshot(**things) -> dict[str, object]:
    """Everything observable about the given models, data and artifact directories, flattened to
    ``{path: value}``: tensors and arrays as (dtype, shape, raw bytes), so NaN compares equal to
    itself and -0.0 differs from 0.0."""
    flat: dict[str, object] = {}

    def walk(path: str, obj: object) -> None:
        if isinstance(obj, nn.Module):
            for name, m in obj.named_modules():
                flat[f"{path}[{name}].class"] = type(m)
                flat[f"{path}[{name}].training"] = m.training
            for name, p in obj.named_parameters():
                flat[f"{path}.{name}.requires_grad"] = p.requires_grad
            for name, t in obj.state_dict().items():
                walk(f"{path}.{name}", t)
        elif isinstance(obj, torch.Tensor):
            flat[path] = _tensor_record(obj)
        elif isinstance(obj, np.ndarray):
            flat[path] = (obj.dtype.str, obj.shape, obj.tobytes())
        elif isinstance(obj, DataLoader):
            walk(f"{path}.dataset", obj.dataset)
        elif isinstance(obj, TensorDataset):
            walk(f"{path}.tensors", obj.tensors)
        elif isinstance(obj, (tuple, list)):
            flat[f"{path}.len"] = len(obj)
            for i, item in enumerate(obj):
                walk(f"{path}[{i}]", item)
        elif isinstance(obj, Path):
            for f in sorted(obj.rglob("*")):
                flat[f"{path}/{f.relative_to(obj)}"] = f.read_bytes() if f.is_file() else "dir"
        else:
            flat[path] = obj

    for key, value in things.items():
        walk(key, value)
    return flat


@contextmanager
def unchanged(**things):
    """Fails when the block changed anything :func:`snapshot` records about ``things``."""
    before = snapshot(**things)
    yield
    after = snapshot(**things)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"changed by the failing call: {changed[:10]}"


def test_snapshot_sees_every_kind_of_change():
    """The helper itself: each change the catalog guards against is seen."""
    changes = {
        "weight": lambda m, d: m[0].weight.data.view(-1)[0].add_(1),
        "bn statistic": lambda m, d: m[1].running_var.data.mul_(2),
        "training flag": lambda m, d: m[3].eval(),
        "requires_grad": lambda m, d: m[6].bias.requires_grad_(False),
        "module class": lambda m, d: m.__setitem__(2, nn.ReLU6()),
        "data": lambda m, d: d.dataset.tensors[0].view(-1)[5].neg_(),
    }
    for what, change in changes.items():
        model, data = tiny(), loader()
        with pytest.raises(AssertionError, match="changed by the failing call"):
            with unchanged(model=model, data=data):
                change(model, data)
            pytest.fail(f"a change of the {what} went unseen")


def compile_fails(error, match, model=None, inputs=(X,), watch=None, **kwargs):
    """``pqcompile.compile`` raises exactly ``error`` with a message matching ``match``, and
    leaves the model, the example inputs, the data and ``watch`` as they were."""
    model = tiny() if model is None else model
    kwargs.setdefault("target", "host")
    kwargs.setdefault("budget", BUDGET)
    with unchanged(model=model, inputs=inputs, data=kwargs.get("data"), watch=watch):
        with pytest.raises(error, match=match) as info:
            pqcompile.compile(model, inputs, **kwargs)
    assert type(info.value) is error, f"{type(info.value).__qualname__} is not {error.__name__}"
    return info.value


# --- the model ---------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("make, match", [
    (lambda: torch.relu, r"model must be a torch.nn.Module, got builtin_function_or_method; "
                         r"wrap a function in an nn.Module whose forward calls it"),
    (lambda: "resnet18", r"model must be a torch.nn.Module, got str"),
    (lambda: torch.jit.script(tiny()), r"model is a TorchScript module; pass the eager "
                                       r"nn.Module instead"),
], ids=["function", "string", "torchscript"])
def test_not_a_module(make, match):
    err = compile_fails(ModelError, match, model=make())
    assert isinstance(err, TypeError)


@pytest.mark.parametrize("where, set_value, match", [
    ("0.weight", float("nan"), r"parameter '0\.weight' \(Conv2d '0'\) holds 1 NaN and 0 inf "
                               r"value\(s\), the first at index \(0, 1, 2, 0\): pqcompile needs "
                               r"finite weights; load a checkpoint .* or re-initialize"),
    ("6.bias", float("inf"), r"parameter '6\.bias' \(Linear '6'\) holds 0 NaN and 1 inf "
                             r"value\(s\).*load a checkpoint from before training diverged"),
    ("1.running_var", float("-inf"), r"buffer '1\.running_var' \(BatchNorm2d '1'\) holds 0 NaN "
                                     r"and 1 inf value\(s\)"),
], ids=["nan-conv-weight", "inf-linear-bias", "inf-batchnorm-statistic"])
def test_non_finite_weights(where, set_value, match):
    model = tiny()
    tensor = model.state_dict()[where]
    index = (0, 1, 2, 0) if tensor.dim() == 4 else (1,)
    tensor[index] = set_value
    err = compile_fails(NonFiniteWeightError, match, model=model)
    assert isinstance(err, ValueError)


# --- the example inputs ------------------------------------------------------------------------

@pytest.mark.parametrize("inputs, match", [
    ((torch.randn(1, 3, 10, 10),), r"node '_6' \(call_module 6: Linear\(in_features=512.*failed "
                                   r"on input shapes \[\(1, 800\)\].*Give example inputs with the "
                                   r"shape and dtype the model expects"),
    ((torch.randn(1, 1, 8, 8),), r"node '_0' \(call_module 0: Conv2d\(3, 8.*expected input"
                                 r".*to have 3 channels.*Give example inputs with the shape"),
], ids=["wrong-spatial-size", "wrong-channels"])
def test_example_input_wrong_shape(inputs, match):
    compile_fails(ExampleInputError, match, inputs=inputs)


def test_example_input_wrong_dtype():
    compile_fails(ExampleInputError, r"node '_0' \(call_module 0: Conv2d.*Input type \(double\)"
                  r".*Give example inputs with the shape and dtype the model expects",
                  inputs=(X.double(),))


@pytest.mark.parametrize("inputs, match", [
    ((X.numpy(),), r"example_inputs\[0\] is ndarray, not a torch.Tensor; convert it with "
                   r"torch.as_tensor"),
    (None, r"example_inputs is required without data: pass a tuple of tensors, one per "
           r"forward\(\) argument .*or data=\.\.\. whose first batch gives it"),
    ((), r"example_inputs must be a non-empty tuple of tensors"),
], ids=["numpy-array", "none", "empty"])
def test_example_input_not_a_tensor(inputs, match):
    compile_fails(ExampleInputError, match, inputs=inputs)


def test_too_many_example_inputs():
    compile_fails(ExampleInputError, r"2 example inputs given but forward\(\) takes 1 "
                  r"\(input_1\)", inputs=(X, X))


# --- what the model computes -------------------------------------------------------------------

def test_dynamic_control_flow_on_tensor_values():
    err = compile_fails(TraceError, r"torch.fx cannot trace submodule 'gate' \(Gate\)",
                        model=WithGate())
    message = str(err)
    assert "test_bad_inputs.py" in message and "if x.sum() > 0" in message  # the user's line
    assert "way out: declare it a leaf" in message and "leaf_modules=['gate']" in message


@pytest.mark.xfail(strict=True, reason="the TraceError's way out is a leaf (compile(..., "
                   "leaf_modules=...)), but a leaf with data-dependent control flow then fails "
                   "in the lowering (it cannot run in float either); compile() should advise "
                   "rewriting the branch with tensor ops (torch.where)")
def test_dynamic_control_flow_advice_works_from_compile():
    compile_fails(TraceError, r"torch\.where", model=WithGate())


def test_unsupported_op():
    compile_fails(UnsupportedOpError, r"node 'erfinv' \(erfinv\) has no integer lowering and "
                  r"cannot run in float.*Make it a leaf module TVM's fx frontend knows, or "
                  r"replace it", model=WithOp(_erfinv))


def test_unsupported_tuple_valued_op():
    compile_fails(UnsupportedOpError, r"node 'sort' \(.*\) returns several tensors; ops returning "
                  r"a tuple have no integer lowering .*replace it with ops returning one tensor",
                  model=WithOp(_sort))


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.fc = nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.lstm(x)[0][:, -1])


def test_recurrent_layer_says_what_is_unsupported():
    """nn.LSTM is a leaf already: the message names recurrent layers, not "make it a leaf"."""
    err = compile_fails(UnsupportedOpError, r"node 'lstm' \(LSTM\) returns several tensors: "
                        r"recurrent layers \(nn\.LSTM, nn\.GRU, nn\.RNN and their cells\) have "
                        r"no integer lowering", model=WithLSTM(), inputs=(torch.randn(1, 5, 8),))
    assert "leaf" not in str(err)


@pytest.mark.xfail(strict=True, reason="a complex-valued op (torch.fft.fft) escapes the "
                   "quantization as torch's raw NotImplementedError with fx's trace appended")
def test_unsupported_complex_op():
    compile_fails(UnsupportedOpError, r"node 'fft_fft'", model=WithOp(_fft))


# --- the data ----------------------------------------------------------------------------------

def test_empty_data_loader():
    empty = DataLoader(TensorDataset(torch.empty(0, 3, 8, 8), torch.empty(0)), batch_size=4)
    compile_fails(DataError, r"data is empty: pass a DataLoader \(or iterable\) of \(inputs, "
                  r"target\) batches, or data=None for the data-free path", data=empty)


@pytest.mark.parametrize("data, match", [
    (loader(shape=(3, 10, 10)), r"data batch 0 \(inputs \(4, 3, 10, 10\) torch.float32\) does "
                                r"not fit the model: node '_6' \(call_module 6: Linear.*mat1 "
                                r"and mat2 shapes cannot be multiplied.*Give batches whose inputs "
                                r"have the example inputs' shape \(batch size aside\) and dtype"),
    (loader(shape=(1, 8, 8)), r"data batch 0 \(inputs \(4, 1, 8, 8\) .*node '_0' \(call_module 0:"
                              r" Conv2d.*to have 3 channels"),
    (loader(dtype=torch.float64), r"data batch 0 \(inputs \(4, 3, 8, 8\) torch.float64\) does "
                                  r"not fit the model: node '_0'.*Input type \(double\)"),
], ids=["wrong-spatial-size", "wrong-channels", "wrong-dtype"])
def test_wrong_shaped_data_batches(data, match):
    compile_fails(DataError, match, model=tiny().train(), data=data)


def test_data_batches_that_are_not_tensors():
    data = [("an image path", torch.zeros(4, dtype=torch.long))]
    compile_fails(DataError, r"data batch 0 is a tuple of \['str', 'Tensor'\]: yield \(inputs, "
                  r"target\) batches whose first 1 item\(s\) are batched input tensors", data=data)


def test_data_read_once():
    batches = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))] * 2
    compile_fails(DataError, r"data is a generator, an iterator that can be read only once.*pass "
                  r"a list of batches or a DataLoader", data=(b for b in batches),
                  watch=batches)


def test_finetune_without_data():
    compile_fails(DataError, r"finetune needs data: pass data= \(a DataLoader of \(inputs, "
                  r"target\) batches\), or finetune=None", finetune={"epochs": 1})


def test_searching_solver_without_data():
    compile_fails(DataError, r"solver 'sbs' searches on data: pass data= .*or pick a data-free "
                  r"solver such as 'ilp'", solver="sbs")


# --- the budget --------------------------------------------------------------------------------

def test_budget_infeasible():
    err = compile_fails(InfeasibleBudgetError, r"no assignment meets the budget: bops <= .* "
                        r"asked, smallest reachable is .*; relax the budget, or widen the search "
                        r"space", budget=Budget(bops="1000x"))
    assert err.minimum["bops"] > err.limits["bops"]


def test_budget_missing():
    compile_fails(BudgetError, r"budget is required, e\.g\. Budget\(bops='60x'\)", budget=None)


@pytest.mark.parametrize("text, match", [
    ("bops", r"budget 'bops': 'bops' is not key=value; write e\.g\. 'bops=60x,"),
    ("flops=60x", r"budget 'flops=60x': unknown key 'flops'; use bops, weight_bytes, macs"),
    ("bops=60y", r"Budget\.bops='60y': expected a number with an optional unit \('k', 'm', 'g', "
                 r"'t'\) or a reduction ratio such as '60x'"),
    ("bops=2x,bops=3x", r"'bops' is given twice; give each key once"),
    ("weight_bytes=5GHz", r"Budget\.weight_bytes='5GHz': expected a number with an optional "
                          r"unit \('b', 'kb'"),
], ids=["no-value", "unknown-key", "unknown-unit", "key-twice", "wrong-unit"])
def test_budget_malformed_text(text, match):
    compile_fails(BudgetError, match, budget=text)


@pytest.mark.parametrize("values, match", [
    ({"bops": -5}, r"Budget\.bops=-5: a limit must be a positive, finite number"),
    ({"bops": float("nan")}, r"Budget\.bops=nan: a limit must be a positive, finite number"),
    ({"bops": "0.5x"}, r"Budget\.bops='0\.5x': a reduction ratio must be at least 1x"),
    ({"bops": "abcx"}, r"Budget\.bops='abcx': a reduction ratio is a number followed by 'x', "
                       r"e\.g\. '60x'"),
    ({}, r"Budget sets no limit: give at least one of bops, weight_bytes, macs, latency_ms"),
], ids=["negative", "nan", "ratio-below-1", "ratio-not-a-number", "no-limit"])
def test_budget_malformed_values(values, match):
    with pytest.raises(BudgetError, match=match) as info:
        Budget(**values)
    assert type(info.value) is BudgetError and isinstance(info.value, ValueError)


# --- the target --------------------------------------------------------------------------------

def test_unknown_target():
    err = compile_fails(UnknownTargetError, r"unknown target 'armm'\. Did you mean 'arm'",
                        target="armm")
    assert "pqcompile targets: arm, arm-dotprod, host" in str(err)
    assert "To add one: pqcompile.targets.register_target(TargetSpec(name='armm'" in str(err)


def test_missing_cross_compiler(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    compile_fails(ToolchainError, r"cross compiler 'aarch64-linux-gnu-gcc' for target 'arm' "
                  r"\(aarch64\) is not on PATH; install it with `apt-get install -y "
                  r"gcc-aarch64-linux-gnu libc6-dev-arm64-cross`", target="arm")


# --- the options -------------------------------------------------------------------------------

def test_unknown_solver():
    compile_fails(OptionError, r"unknown solver 'ilpp'\. Did you mean 'ilp'\? Registered solvers: "
                  r"ajpq, .*register_solver", solver="ilpp")


def test_unknown_finetune_option():
    compile_fails(OptionError, r"unknown finetune options \['epoch'\] \('epoch': did you mean "
                  r"'epochs'\?\); known: \[", finetune={"epoch": 1}, data=loader())


@pytest.mark.parametrize("options, match", [
    ([(16, 16), (8, 8)], r"bit_options: \(16, 16\) is not a \(weight bits, activation bits\) pair "
                         r"of ints in 2\.\.8, the widths the integer lowering takes; e\.g\. "
                         r"\(4, 8\)"),
    ([(8, 8), (4, 1)], r"bit_options: \(4, 1\) is not a \(weight bits, activation bits\) pair"),
    ([(8, 8), (4.0, 8)], r"bit_options: \(4\.0, 8\) is not a \(weight bits, activation bits\)"),
    ([(8, 8), 4], r"bit_options: 4 is not a \(weight bits, activation bits\) pair"),
    ("8", r"bit_options must be a list of \(weight bits, activation bits\) pairs such as "
          r"\[\(8, 8\), \(4, 8\)\], got '8'"),
    ([], r"bit_options is empty: give \(weight bits, activation bits\) pairs such as \[\(8, 8\), "
         r"\(4, 8\)\], or None for the default"),
    ([(4, 8), (2, 8)], r"bit_options \[\(2, 8\), \(4, 8\)\] lack \(8, 8\): the first and last "
                       r"layers are kept at 8/8 bits; add \(8, 8\)"),
], ids=["above-8", "below-2", "float", "not-a-pair", "string", "empty", "no-8-8"])
def test_bad_bit_options(options, match):
    compile_fails(OptionError, match, bit_options=options)


@pytest.mark.parametrize("levels", [[1.0, 0.0], [1.5], "half", [], [float("nan")]],
                         ids=["zero", "above-1", "string", "empty", "nan"])
def test_bad_keep_levels(levels):
    compile_fails(OptionError, r"keep_levels must be fractions in \(0, 1\] of each channel "
                  r"group's channels, e\.g\. \(1\.0, 0\.75, 0\.5\), got .*; \(1\.0,\) keeps every "
                  r"channel \(no pruning\)", keep_levels=levels)


@pytest.mark.parametrize("name, value", [("calibration_batches", 0),
                                         ("sensitivity_batches", 2.5)])
def test_bad_batch_counts(name, value):
    compile_fails(OptionError, rf"{name} must be a positive int \(a number of data batches\), "
                  rf"got {value}", data=loader(), **{name: value})


# --- artifacts ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled():
    return pqcompile.compile(tiny().eval(), (X,), target="host", budget=BUDGET)


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    return compiled.save(tmp_path_factory.mktemp("bad-inputs") / "artifact")


@pytest.fixture
def copy(saved, tmp_path):
    """A copy of the saved artifact that a case may damage."""
    return Path(shutil.copytree(saved, tmp_path / "artifact"))


@pytest.mark.parametrize("lowered, built", [("arm", "host"), ("arm-dotprod", "arm")])
def test_program_lowered_for_another_instruction_set(compiled, lowered, built):
    """A program with one target's kernels, built for a target without those instructions, is
    refused before LLVM sees it (an x86 LLVM aborts the process on NEON intrinsics)."""
    from pqcompile.lower import lower
    from pqcompile.runtime.artifact import Artifact

    program, params, _ = lower(compiled.reference, target=lowered)
    with pytest.raises(ValueError, match=rf"lowered with '\w+' kernels, which target "
                                         rf"'{built}'.*retarget\('{built}'\)"):
        Artifact.build(program, params, built)


def test_table_lookups_lowered_for_vbmi_refused_without_it():
    """A program whose table lookups use AVX-512 VBMI (``vpermi2b``), built for an x86 CPU
    with VNNI but not VBMI (Cascade Lake), is refused naming the instruction set: LLVM would
    abort the process on the intrinsic."""
    from pqcompile.assignment import Assignment
    from pqcompile.build import compile_assignment
    from pqcompile.lower import lower
    from pqcompile.targets import TargetSpec

    icelake = TargetSpec("icelake", "x86 with VBMI", {"kind": "llvm", "mcpu": "icelake-server"},
                         "x86_64")
    cascade = TargetSpec("cascadelake", "x86 with VNNI, no VBMI",
                         {"kind": "llvm", "mcpu": "cascadelake"}, "x86_64")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 1)).eval()
    c = compile_assignment(model, (X,), Assignment.uniform(["_0", "_2"], 8, 8), target="host",
                           calibration=[torch.randn(2, 3, 8, 8)])
    program, params, report = lower(c.reference, target=icelake)
    assert report.kernels["_1"] == "lut vbmi"
    with pytest.raises(ValueError, match=r"lowered with 'vbmi' table lookups \(AVX-512 VBMI\), "
                                         r"which target 'cascadelake' lacks.*retarget"):
        Artifact.build(program, params, cascade)
    program, params, report = lower(c.reference, target=cascade)  # the scalar lookups
    assert report.kernels["_1"] == "lut scalar"
    Artifact.build(program, params, cascade)


def load_fails(directory, match):
    with unchanged(artifact=directory):
        with pytest.raises(ArtifactError, match=match) as info:
            Artifact.load(directory)
    assert type(info.value) is ArtifactError and isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["lib.so", "weights.bin"])
def test_corrupted_artifact_file(copy, name):
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    load_fails(copy, rf"cannot load the artifact in .*: {name} does not match the sha256 in "
                     r"manifest\.json: the file was modified or corrupted after it was saved; "
                     r"copy the artifact directory again from where it was saved, or rebuild it")


def test_artifact_file_missing(copy):
    (copy / "weights.bin").unlink()
    load_fails(copy, r"weights\.bin is missing from .*; copy the artifact directory again")


def test_not_an_artifact_directory(tmp_path):
    load_fails(tmp_path, r"cannot read manifest\.json in .*: it is missing, modified or "
                         r"corrupted .*; copy the artifact directory again")


def test_tampered_manifest(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["layers"][0]["weight_bits"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    load_fails(copy, r"manifest\.json does not match its integrity checksum: the manifest was "
                     r"modified or corrupted after it was saved; copy the artifact directory "
                     r"again")


@pytest.mark.parametrize("version, remedy", [(FORMAT_VERSION + 1, "update pqcompile"),
                                             (FORMAT_VERSION - 1, "rebuild the artifact with "
                                                                  "this pqcompile")],
                         ids=["newer", "older"])
def test_manifest_format_version_mismatch(copy, version, remedy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format"] = version
    (copy / "manifest.json").write_text(json.dumps(manifest))
    load_fails(copy, rf"manifest\.json has format version {version} but this reader supports "
                     rf"format version {FORMAT_VERSION}: {remedy}$")


@pytest.fixture(params=["compiled", "loaded"])
def runnable(request, compiled, saved):
    """The model as compiled, and as loaded back from its saved artifact."""
    return compiled if request.param == "compiled" else Artifact.load(saved)


@pytest.mark.parametrize("inputs, match", [
    ((np.zeros((1, 3, 9, 9), np.float32),),
     r"input 'input_1' must have shape \(1, 3, 8, 8\) and dtype float32, got shape \(1, 3, 9, 9\) "
     r"and dtype float32; .*compile again with example inputs of the shape to run"),
    ((np.zeros((2, 3, 8, 8), np.float32),),
     r"got shape \(2, 3, 8, 8\) .*\(shapes, batch size included, are fixed when compiling\)"),
    ((X.double().numpy(),),
     r"input 'input_1' must have shape \(1, 3, 8, 8\) and dtype float32, got shape \(1, 3, 8, 8\) "
     r"and dtype float64; convert the array to that dtype"),
    ((X.numpy(), X.numpy()), r"expected the inputs \['input_1'\], got 2; pass one array per "
                             r"input, in that order"),
], ids=["wrong-shape", "wrong-batch-size", "wrong-dtype", "too-many"])
def test_wrong_inputs_at_run_time(runnable, inputs, match):
    with unchanged(inputs=inputs):
        with pytest.raises(ArtifactError, match=match) as info:
            runnable(*inputs)
    assert type(info.value) is ArtifactError and isinstance(info.value, ValueError)


def test_save_over_an_existing_artifact(compiled, copy):
    with unchanged(artifact=copy):
        with pytest.raises(ArtifactError, match=r"already holds an artifact; pass overwrite=True "
                                                 r"to replace it") as info:
            compiled.save(copy)
    assert type(info.value) is ArtifactError


def test_out_of_range_token_ids_are_refused_by_the_program():
    """The reference raises IndexError for an id past the table; the compiled program (host
    here, the same check runs on the device) refuses it naming the embedding, and never reads
    outside the table."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 4)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    torch.manual_seed(0)
    ids = torch.randint(0, 10, (2, 5))
    c = pqcompile.compile(Tokens().eval(), (ids,), target="host", budget="bops=4x")
    np.testing.assert_array_equal(c(ids.numpy()), c.reference(ids).numpy())
    for bad_id in (10, 1_000_000, -1):
        bad = ids.clone()
        bad[0, 0] = bad_id
        with pytest.raises(IndexError):
            c.reference(bad)
        with pytest.raises(AssertionError, match=r"node 'emb' \(embedding\): ids must be in "
                                                 r"\[0, 10\)"):
            c(bad.numpy())


# --- paths a new user takes (the README's flow, probes of the public calls) ---------------------

def test_torch_compiled_model_names_orig_mod():
    model = torch.compile(tiny())
    err = compile_fails(ModelError, r"model is a torch\.compile'd module \(OptimizedModule\), "
                        r"which torch\.fx cannot trace; pass the eager module it wraps: "
                        r"model\._orig_mod", model=model)
    assert isinstance(err, TypeError)


def test_batch_size_zero():
    compile_fails(ExampleInputError, r"example_inputs\[0\] has batch size 0 \(shape \(0, 3, 8, "
                  r"8\)\): there is nothing to trace or calibrate on", inputs=(X[:0],))


@pytest.mark.parametrize("name, match", [
    ("cuda", r"target 'cuda': pqcompile builds integer programs for CPUs only .*GPU targets are "
             r"not supported\. Use one of arm, arm-dotprod, host"),
    ("Hots", r"unknown target 'Hots'\. Did you mean 'host'\?"),
], ids=["gpu", "close-match-any-case"])
def test_unknown_target_names(name, match):
    compile_fails(UnknownTargetError, match, target=name)


@pytest.mark.parametrize("name", ["ARM", "aarch64", "arm64", "Host"])
def test_target_aliases(name):
    from pqcompile.targets import get_target

    assert get_target(name).name == name.lower().replace("aarch64", "arm").replace("arm64",
                                                                                   "arm")


def test_budget_semicolon_separates_entries():
    assert Budget.parse("bops=8x;macs=2x") == Budget(bops="8x", macs="2x")
    assert Budget.parse("bops=8x; weight_bytes=1MB,macs=2x") == Budget(
        bops="8x", weight_bytes=1_000_000, macs="2x")


def test_example_inputs_from_the_data(tmp_path):
    """compile(model, target=..., budget=..., data=loader): the example input is the first
    sample of the first batch, and the report says so; model and data unchanged."""
    model, data = tiny(), loader()
    with unchanged(model=model, data=data):
        c = pqcompile.compile(model, target="host", budget=BUDGET, data=data)
    first = data.dataset.tensors[0][:1]
    (sample_in,), _ = c.artifact.reference_sample
    np.testing.assert_array_equal(sample_in, first.numpy())
    assert "example input: the first sample of data's first batch, shape (1, 3, 8, 8)" in \
        c.report()
    np.testing.assert_array_equal(c(first.numpy()), c.reference(first).numpy())


def test_read_once_data_without_example_inputs():
    data = iter(list(loader()))
    with pytest.raises(DataError, match=r"data is a read-once iterator, and without "
                                        r"example_inputs its first batch would be used up"):
        pqcompile.compile(tiny(), target="host", budget=BUDGET, data=data)
    assert len(list(data)) == 2  # nothing was consumed


def test_artifact_constructor_given_a_directory(saved):
    with unchanged(artifact=saved):
        with pytest.raises(ArtifactError, match=r"Artifact\('.*'\): to open a saved artifact "
                                                r"use Artifact\.load\('.*'\)"):
            Artifact(str(saved))
        with pytest.raises(ArtifactError, match=r"use Artifact\.load"):
            Artifact(saved)


def test_save_to_a_file_path(compiled, tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"the user's file")
    with unchanged(files=tmp_path):
        with pytest.raises(ArtifactError, match=r"cannot save the artifact to .*model\.bin: it is "
                                                r"a file, and an artifact is a directory"):
            compiled.save(target)


def test_save_into_a_folder_of_other_files(compiled, tmp_path):
    """The user's own runner.py is never overwritten unless asked."""
    (tmp_path / "runner.py").write_text("print('the user's script')\n")
    (tmp_path / "notes.txt").write_text("keep\n")
    with unchanged(files=tmp_path):
        with pytest.raises(ArtifactError, match=r"holds files and no artifact \(saving would "
                                                r"replace runner\.py\): save to a new or empty "
                                                r"directory, or pass overwrite=True"):
            compiled.save(tmp_path)
    compiled.save(tmp_path, overwrite=True)  # asked: written, the other file kept
    assert Artifact.load(tmp_path).manifest == compiled.artifact.manifest
    assert (tmp_path / "notes.txt").read_text() == "keep\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert compiled.save(empty) == empty  # an empty directory is fine


def test_nan_input_at_run_time(runnable):
    bad = X.numpy().copy()
    bad[0, 1, 2, 3] = np.nan
    with unchanged(inputs=(bad,)):
        with pytest.raises(ArtifactError, match=r"input 'input_1' holds NaN, which has no "
                                                r"quantized value .*replace or drop the NaN"):
            runnable(bad)
    inf = X.numpy().copy()
    inf[0, 1, 2, 3] = np.inf  # inf saturates, as in the reference: still accepted
    runnable(inf)


def test_nan_input_in_the_device_runner(saved, tmp_path):
    import subprocess
    import sys

    bad = X.numpy().copy()
    bad[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "x.npy", bad)
    proc = subprocess.run([sys.executable, str(saved / "runner.py"), str(saved), "--input",
                           str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: input 'input_1' holds NaN, which has no quantized value" in proc.stderr


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        features = torch.relu(self.conv(x)).mean((2, 3))
        return {"logits": self.fc(features), "features": features}


def test_dict_outputs_keep_their_keys(tmp_path):
    torch.manual_seed(0)
    model = DictOut().eval()
    with unchanged(model=model, inputs=(X,)):
        c = pqcompile.compile(model, (X,), target="host", budget="bops=4x")
    reference = c.reference(X)
    for runnable in (c, Artifact.load(c.save(tmp_path / "a"))):
        out = runnable(X.numpy())
        assert isinstance(out, dict) and list(out) == ["logits", "features"]
        for key in out:
            np.testing.assert_array_equal(out[key], reference[key].numpy())
