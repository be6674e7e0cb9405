"""The peers pqcompile's latency is compared with, each built the way its users would build it.

Every builder returns something to call with one batch-1 input; :func:`agreement` compares a
peer's logits with the float model's, so no peer is timed on a broken model.

- :func:`torch_fp32`: torch eager, ``torch.inference_mode``;
- :func:`torch_int8_dynamic`: for BERT encoders, torch's dynamic int8 Linear layers;
- :func:`torch_int8`: torch's own post-training static int8 (``torch.ao.quantization`` FX graph
  mode, the ``x86`` engine's default qconfig: per-channel symmetric int8 weights, histogram-
  calibrated uint8 activations), calibrated on the given batches;
- :func:`export_onnx` + :func:`ort_session`: ONNX Runtime fp32 (TorchScript exporter, opset 17,
  batch 1 fixed; CPU provider, all graph optimizations, ``threads`` intra-op threads);
- :func:`ort_int8`: ONNX Runtime static int8 (``quant_pre_process``, then ``quantize_static``:
  QDQ format, per-channel int8 weights, uint8 activations, MinMax calibration through a
  :class:`CalibrationDataReader` over the given batches, fed one image at a time);
- :func:`tvm_fp32`: TVM's own fp32 build (the torch.export frontend, the default untuned
  pipeline for the host target).

:func:`set_threads` fixes every backend's thread count; ``TVM_NUM_THREADS`` is read when TVM's
thread pool starts (its first parallel call), so it must be set before any TVM run.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch


def set_threads(threads: int) -> None:
    """torch's intra-op threads and TVM's pool size (ONNX Runtime's go in each session); the
    rest of TVM's pool as artifacts set it up (workers unpinned, unless ``TVM_BIND_THREADS``
    is set: :func:`pqcompile.runtime.artifact.thread_pool_defaults`), for every TVM variant
    alike."""
    from pqcompile.runtime.artifact import thread_pool_defaults

    torch.set_num_threads(threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)
    thread_pool_defaults()


def tvm_threads() -> int:
    """Threads of TVM's pool in this process (starts the pool if it is not running yet)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())


# --- torch -----------------------------------------------------------------------------------


def torch_fp32(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return run


def torch_int8(model: torch.nn.Module, example: torch.Tensor, calibration: Iterable[torch.Tensor],
               engine: str = "x86") -> torch.nn.Module:
    """FX graph mode post-training static quantization of a copy of ``model``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(engine),
                              (example,))
        with torch.inference_mode():
            for batch in calibration:
                prepared(batch)
        return convert_fx(prepared).eval()


def torch_int8_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """torch's dynamic int8 quantization of a copy of ``model``'s Linear layers (int8 weights,
    activations quantized per call): what torch offers BERT encoders, which FX graph mode
    cannot trace."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear},
                                dtype=torch.qint8)


# --- ONNX Runtime ----------------------------------------------------------------------------


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """``model`` as an fp32 ONNX file for the shape of ``example`` (input ``x``, output ``y``)."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], do_constant_folding=True)
    return path


def ort_session(path: str | Path, threads: int):
    """A CPU session with ``threads`` intra-op threads and every graph optimization."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_runner(session) -> Callable[[np.ndarray], np.ndarray]:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def ort_int8(fp32_path: str | Path, out_dir: str | Path,
             calibration: Iterable[torch.Tensor], *, calibrate_method=None,
             reduce_range: bool = False) -> Path:
    """Static QDQ int8 model of the fp32 ONNX file (written to ``out_dir``); the calibration
    batches are fed one image (or token sequence) at a time (the model's batch is fixed to 1)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    images = [b[i:i + 1].numpy() for b in calibration for i in range(len(b))]
    images = [a.astype(np.float32) if a.dtype.kind == "f" else a for a in images]  # ids stay

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(images)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {"x": x}

        def rewind(self) -> None:
            self._it = iter(images)

    out_dir = Path(out_dir)
    pre = out_dir / (Path(fp32_path).stem + ".pre.onnx")
    method = CalibrationMethod.MinMax if calibrate_method is None else calibrate_method
    suffix = ("" if calibrate_method is None else f".{method.name}") \
        + (".w7" if reduce_range else "")
    out = out_dir / (Path(fp32_path).stem + f"{suffix}.int8.onnx")
    if not pre.is_file():
        quant_pre_process(str(fp32_path), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=method,
                    reduce_range=reduce_range)
    return out


# --- TVM -------------------------------------------------------------------------------------


def tvm_fp32(model: torch.nn.Module, x: torch.Tensor) -> Callable[[np.ndarray], np.ndarray]:
    """TVM's default (untuned) fp32 build of ``model`` for the host, for inputs shaped like
    ``x``; the weights are bound once, each call passes only the input."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from pqcompile.targets import get_target

    ep = torch.export.export(model, (x,))
    mod, params = relax.frontend.detach_params(
        from_exported_program(ep, keep_params_as_input=True))
    ex = tvm.compile(mod, get_target("host").tvm_target())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    weights = list(params["main"])

    def run(xn: np.ndarray) -> np.ndarray:
        out = vm["main"](tvm.runtime.tensor(xn), *weights)
        while not hasattr(out, "numpy"):  # a tuple output
            out = out[0]
        return out.numpy()
    return run


# --- correctness -----------------------------------------------------------------------------


def agreement(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> dict:
    """How closely ``outputs`` follow ``reference`` (logits on the same inputs): the largest
    absolute difference, it relative to the reference's largest magnitude, the smallest
    cosine similarity of one input's logits, the top-1 agreement and :func:`matched`."""
    ref = np.concatenate([np.asarray(r, np.float64).reshape(len(r), -1) for r in reference])
    out = np.concatenate([np.asarray(o, np.float64).reshape(len(o), -1) for o in outputs])
    diff = float(np.abs(ref - out).max())
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
                                + 1e-30)
    return {"max_abs_diff": diff, "rel_max_abs_diff": diff / float(np.abs(ref).max()),
            "min_cosine": float(cos.min()),
            "top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean()),
            "matched": matched(reference, outputs)}


def matched(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """The fraction of inputs whose output is nearer (Euclidean) to that input's reference
    than to any other input's: ~1/len for a model whose output ignores its input or mixes
    inputs up, 1.0 for a faithful one. (Random-weight models' logits share a large
    input-independent part, so cosine similarity alone flatters a broken model.)"""
    ref = np.stack([np.asarray(r, np.float64).ravel() for r in reference])
    out = np.stack([np.asarray(o, np.float64).ravel() for o in outputs])
    dist = ((out[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    return float((dist.argmin(1) == np.arange(len(ref))).mean())


#: BERT encoders by name: (layers, hidden, heads, FFN width); ``bert_minilm`` is MiniLM-L6-H384
#: sized (all-MiniLM-L6-v2's shape), ``bert_base`` bert-base-uncased's. Vocabulary 30522,
#: 512 positions, token ids in and the last hidden state out (batch 1, ``size`` tokens).
BERT_SHAPES = {"bert_minilm": (6, 384, 12, 1536), "bert_base": (12, 768, 12, 3072)}
BERT_VOCAB = 30522


class BertEncoder(torch.nn.Module):
    """A Hugging Face ``BertModel`` on token ids (every position attended), returning its last
    hidden state: one tensor, which every runtime here returns alike."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).last_hidden_state


def is_text(name: str) -> bool:
    """Whether ``name`` is one of :data:`BERT_SHAPES` (token ids in) rather than torchvision's."""
    return name in BERT_SHAPES


def draw(name: str, size: int, generator: torch.Generator, batch: int = 1) -> torch.Tensor:
    """A random input batch for model ``name``: ``size`` x ``size`` normal images, or ``size``
    uniform token ids for a BERT encoder."""
    if is_text(name):
        return torch.randint(0, BERT_VOCAB, (batch, size), generator=generator)
    return torch.randn(batch, 3, size, size, generator=generator)


def example_inputs(name: str, size: int, seed: int = 0
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The timed input (batch 1) and two calibration batches of 4, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = draw(name, size, g)
    return x, [draw(name, size, g, 4) for _ in range(2)]


def make_bert(name: str, seed: int = 0) -> torch.nn.Module:
    """A :class:`BertEncoder` of shape ``BERT_SHAPES[name]`` with random weights (Hugging Face's
    initialization from ``seed``; eager attention, which every exporter and tracer here takes),
    in eval mode."""
    from transformers import BertConfig, BertModel

    layers, hidden, heads, ffn = BERT_SHAPES[name]
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=BERT_VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=ffn, hidden_act="gelu",
                     max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                     attn_implementation="eager")
    return BertEncoder(BertModel(cfg, add_pooling_layer=False)).eval()


def make_model(name: str, size: int, seed: int = 0, batches: int = 4) -> torch.nn.Module:
    """A BERT encoder (:func:`make_bert`, for the names in :data:`BERT_SHAPES`), or torchvision
    ``name`` with random weights (``seed``), in eval mode, its BatchNorm
    statistics set from ``batches`` random batches of 8 (``size`` x ``size``). Latency does not
    depend on the weights, but with the default statistics (mean 0, variance 1) activations
    shrink or grow layer after layer (mobilenet_v2's logits are ~1e-9, the same for every
    input), which makes agreement checks and int8 calibration meaningless."""
    import torchvision

    if is_text(name):
        return make_bert(name, seed)
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
    model.train()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, 3, size, size, generator=g))
    return model.eval()
