"""Artifacts: build, save/load, integrity checks, the standalone runner, aarch64 under qemu.

Everything runs real TVM builds of a small integer module: an int8 conv whose weight is a
function parameter, a second conv whose 4-bit weights arrive packed two per byte (uint8) and are
unpacked in the graph, and an int32 plus a float32 output.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm.script import relax as R

from pqcompile.runtime.artifact import FORMAT_VERSION, Artifact, ArtifactError, thread_pool_defaults
from pqcompile.targets import elf_arch, host_arch

ROOT = Path(__file__).resolve().parents[1]
FILES = {"manifest.json", "lib.so", "weights.bin", "sample.bin", "runner.py"}


@tvm.script.ir_module
class PackedConvs:
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "int8"), w: R.Tensor((8, 4, 3, 3), "int8"),
             w4: R.Tensor((8, 36), "uint8"), scale: R.Tensor((1, 8, 1, 1), "float32")):
        with R.dataflow():
            acc1 = R.nn.conv2d(x, w, padding=(1, 1), out_dtype="int32")
            y1 = R.astype(R.clip(R.right_shift(acc1, R.const(7, "int32")), -128, 127), "int8")
            lo = R.bitwise_and(w4, R.const(15, "uint8"))
            hi = R.right_shift(w4, R.const(4, "uint8"))
            nibbles = R.reshape(R.concat([R.expand_dims(lo, 2), R.expand_dims(hi, 2)], axis=2),
                                (8, 8, 3, 3))
            w2 = R.subtract(R.astype(nibbles, "int8"), R.const(8, "int8"))
            acc2 = R.nn.conv2d(y1, w2, padding=(1, 1), out_dtype="int32")
            out = R.multiply(R.astype(acc2, "float32"), scale)
            res = (acc2, out)
            R.output(res)
        return res


# conv1: 64 positions x 8 x 4 x 9 MACs at 8/8 bits; conv2: 64 x 8 x 8 x 9 at 4/8 bits.
LAYERS = [
    {"name": "conv1", "weight_bits": 8, "activation_bits": 8, "kept_channels": 8,
     "total_channels": 8, "macs": 18432, "bops": 18432 * 64, "weight_bytes": 288},
    {"name": "conv2", "weight_bits": 4, "activation_bits": 8, "kept_channels": 8,
     "total_channels": 8, "macs": 36864, "bops": 36864 * 32, "weight_bytes": 288},
]
TOTALS = {"macs": 55296, "bops": 18432 * 64 + 36864 * 32, "weight_bytes": 576}
RNG = np.random.default_rng(0)
PARAMS = {
    "w": RNG.integers(-128, 128, (8, 4, 3, 3), dtype=np.int8),
    "w4": RNG.integers(0, 256, (8, 36), dtype=np.uint8),
    "scale": RNG.uniform(1e-3, 1e-2, (1, 8, 1, 1)).astype(np.float32),
}
X = RNG.integers(-128, 128, (1, 4, 8, 8), dtype=np.int8)
X2 = RNG.integers(-128, 128, (1, 4, 8, 8), dtype=np.int8)


def _conv3x3(x, w):
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, width = x.shape[2:]
    return sum(np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + width],
                         w[:, :, i, j].astype(np.int64)) for i in range(3) for j in range(3))


def reference(x):
    """The module in numpy: what every build must compute."""
    y1 = np.clip(_conv3x3(x, PARAMS["w"]) >> 7, -128, 127).astype(np.int8)
    w4 = PARAMS["w4"]
    w2 = np.stack([w4 & 15, w4 >> 4], axis=2).reshape(8, 8, 3, 3).astype(np.int8) - 8
    acc2 = _conv3x3(y1, w2).astype(np.int32)
    return acc2, acc2.astype(np.float32) * PARAMS["scale"]


def build(target="host", **kwargs):
    options = {"layers": LAYERS, "totals": TOTALS, "reference_sample": ((X,), reference(X))}
    options.update(kwargs)
    return Artifact.build(PackedConvs, PARAMS, target, **options)


@pytest.fixture(scope="module")
def host_art():
    return build()


@pytest.fixture(scope="module")
def saved(host_art, tmp_path_factory):
    return host_art.save(tmp_path_factory.mktemp("artifact") / "model")


@pytest.fixture
def copy(saved, tmp_path):
    """A copy of the saved artifact that a test may damage."""
    return Path(shutil.copytree(saved, tmp_path / "model"))



# Starts runner.py with torch and pqcompile unimportable (an import of either fails), as on a
# device that has neither (tvm_ffi tries `import torch` and carries on without it), and prints
# at exit which of torch, pqcompile, numpy and tvm were loaded.
_ISOLATED = (
    "import atexit, runpy, sys; sys.modules.update(torch=None, pqcompile=None); "
    "atexit.register(lambda: print('loaded:', sorted(k for k, v in sys.modules.items() if v "
    "is not None and k.split('.')[0] in ('torch', 'pqcompile', 'numpy', 'tvm') and '.' not in "
    "k), file=sys.stderr)); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], "
    "run_name='__main__')")


def run_runner(directory, *args, cwd):
    """The standalone runner in a fresh isolated interpreter (-I: no PYTHONPATH, no user site,
    no script directory on sys.path) where neither torch nor pqcompile can be imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-I", "-c", _ISOLATED,
                           str(Path(directory) / "runner.py"), str(directory), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_host_build_computes_the_reference(host_art):
    acc, out = host_art(X)
    want_acc, want_out = reference(X)
    assert acc.dtype == np.int32 and out.dtype == np.float32
    assert np.array_equal(acc, want_acc)
    np.testing.assert_allclose(out, want_out, rtol=1e-6)
    assert np.abs(acc).max() > 1000  # the data exercise the int32 range, not just zeros


def test_each_call_sees_its_own_inputs_also_from_threads(host_art):
    # the inputs are copied into tensors kept from call to call: a later call must not see an
    # earlier call's input, a non-contiguous array must be copied as its values, and calls
    # from several threads must each get their own input's outputs
    from concurrent.futures import ThreadPoolExecutor

    strided = np.asfortranarray(X2)
    assert not strided.flags.c_contiguous
    for x in (X, X2, strided, X):
        acc, _ = host_art(x)
        assert np.array_equal(acc, reference(x)[0])
    inputs = [RNG.integers(-128, 128, (1, 4, 8, 8), dtype=np.int8) for _ in range(16)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: host_art(x)[0], inputs))
    for x, acc in zip(inputs, results):
        assert np.array_equal(acc, reference(x)[0])
    # inputs go in through numpy views of the kept tensors (DLPack) and outputs come back as
    # copies: a result kept from one call is not overwritten by the next
    assert all(v is not None for v in host_art._input_views)
    kept = host_art(X)[0]
    before = kept.copy()
    host_art(X2)
    assert np.array_equal(kept, before) and not np.array_equal(kept, reference(X2)[0])


def test_thread_pool_defaults_fill_in_only_what_the_environment_leaves_out(monkeypatch):
    # every CPU this process may use, workers not pinned (a pinned worker waits for its core
    # when another process is using it); what the user sets is kept
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("TVM_BIND_THREADS", raising=False)
    thread_pool_defaults()
    assert os.environ["TVM_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))
    assert os.environ["TVM_BIND_THREADS"] == "0"
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    monkeypatch.setenv("TVM_BIND_THREADS", "1")
    thread_pool_defaults()
    assert os.environ["TVM_NUM_THREADS"] == "1" and os.environ["TVM_BIND_THREADS"] == "1"


def test_round_trip_gives_identical_outputs(host_art, saved):
    loaded = Artifact.load(saved)
    for x in (X, X2):
        for got, want in zip(loaded(x), host_art(x)):
            assert got.dtype == want.dtype and np.array_equal(got, want)
    assert loaded.manifest == host_art.manifest
    assert all(np.array_equal(loaded.params[k], v) for k, v in PARAMS.items())
    assert list(loaded.params) == ["w", "w4", "scale"]
    sample_in, sample_out = loaded.reference_sample
    assert np.array_equal(sample_in[0], X) and np.array_equal(sample_out[0], reference(X)[0])
    assert loaded.nbytes == host_art.nbytes == sum(
        (saved / name).stat().st_size for name in ("lib.so", "weights.bin"))
    assert loaded.arch == host_arch() and loaded.target.name == "host"


def test_saves_and_rebuilds_are_byte_identical(host_art, saved, tmp_path):
    again = host_art.save(tmp_path / "again")
    rebuilt = build().save(tmp_path / "rebuilt")
    reloaded = Artifact.load(saved).save(tmp_path / "reloaded")
    assert {p.name for p in saved.iterdir()} == FILES
    for directory in (again, rebuilt, reloaded):
        assert {p.name for p in directory.iterdir()} == FILES
        for name in FILES:
            assert (directory / name).read_bytes() == (saved / name).read_bytes(), name


def _keys(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from _keys(v)


def test_manifest_schema_and_weights_layout(saved):
    text = (saved / "manifest.json").read_text()
    m = json.loads(text)
    assert m["format"] == FORMAT_VERSION
    assert m["calling_convention"] == "inputs_then_params" and m["entry"] == "main"
    assert m["inputs"] == [{"name": "x", "shape": [1, 4, 8, 8], "dtype": "int8"}]
    assert m["outputs"] == [{"name": "output0", "shape": [1, 8, 8, 8], "dtype": "int32"},
                            {"name": "output1", "shape": [1, 8, 8, 8], "dtype": "float32"}]
    assert m["layers"] == LAYERS and m["totals"] == TOTALS
    assert m["target"]["arch"] == host_arch() and m["target"]["spec"]["name"] == "host"
    assert json.loads(m["target"]["tvm_target"])["kind"] == "llvm"
    assert m["created_with"]["tvm"] == tvm.__version__
    raw = (saved / "weights.bin").read_bytes()
    assert [(p["name"], p["dtype"], p["shape"]) for p in m["params"]] == [
        ("w", "int8", [8, 4, 3, 3]), ("w4", "uint8", [8, 36]), ("scale", "float32", [1, 8, 1, 1])]
    for p in m["params"]:
        assert p["offset"] % 64 == 0
        stored = np.frombuffer(raw[p["offset"]:p["offset"] + p["nbytes"]], dtype=p["dtype"])
        assert np.array_equal(stored.reshape(p["shape"]), PARAMS[p["name"]])
    assert [p["offset"] for p in m["params"]] == [0, 320, 640]  # 288 bytes each, then aligned
    assert len(raw) == 640 + 32
    for name, info in m["files"].items():
        data = (saved / name).read_bytes()
        assert info == {"sha256": hashlib.sha256(data).hexdigest(), "nbytes": len(data)}
    assert m["reference_sample"]["rtol"] > 0 and len(m["reference_sample"]["outputs"]) == 2
    # portable and reproducible: no paths of this machine, no clock
    for path in (str(saved), str(ROOT), str(Path.home()), "/tmp"):
        assert path not in text
    assert not [k for k in _keys(m) if "time" in k or "date" in k]


@pytest.mark.parametrize("name", ["weights.bin", "lib.so", "sample.bin", "runner.py"])
def test_a_flipped_byte_is_caught_and_named(copy, name):
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{name} does not match .*modified or corrupted"):
        Artifact.load(copy)


def test_an_edited_manifest_is_caught(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["layers"][1]["weight_bits"] = 3
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ArtifactError, match=r"manifest\.json .*modified or corrupted"):
        Artifact.load(copy)


def test_a_missing_file_is_named(copy):
    (copy / "weights.bin").unlink()
    with pytest.raises(ArtifactError, match="weights.bin is missing"):
        Artifact.load(copy)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, FORMAT_VERSION - 1])
def test_an_unsupported_format_names_both_versions(copy, version):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format"] = version
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=rf"format version {version} .*supports format "
                                            rf"version {FORMAT_VERSION}"):
        Artifact.load(copy)


def test_wrong_inputs_name_the_input_and_what_it_needs(host_art):
    want = r"input 'x' must have shape \(1, 4, 8, 8\) and dtype int8"
    with pytest.raises(ValueError, match=want + r", got shape \(1, 4, 8, 9\)"):
        host_art(np.zeros((1, 4, 8, 9), np.int8))
    with pytest.raises(ValueError, match=want + r", got shape \(1, 4, 8, 8\) and dtype float32"):
        host_art(X.astype(np.float32))
    with pytest.raises(ValueError, match=r"expected the inputs \['x'\], got 2"):
        host_art(X, X)


def test_build_checks_params_specs_and_records(tmp_path):
    swapped = {"w4": PARAMS["w4"], "w": PARAMS["w"], "scale": PARAMS["scale"]}
    with pytest.raises(ValueError, match=r"params\['w4'\] is passed as parameter #1 .*"
                                         r"function's parameter order"):
        Artifact.build(PackedConvs, swapped, "host")
    with pytest.raises(ValueError, match=r"input 'x': input_specs says shape \(1, 4, 8, 9\)"):
        build(input_specs=[("x", (1, 4, 8, 9), "int8")])
    with pytest.raises(ValueError, match=r"totals lacks \['bops'\]"):
        build(totals={"macs": 1, "weight_bytes": 2})
    with pytest.raises(ValueError, match=r"reference_sample output 'output1' must have .*float32"):
        build(reference_sample=((X,), (reference(X)[0], reference(X)[0])))
    with pytest.raises(TypeError, match=r"extra\['when'\] is of type object"):
        build(extra={"when": object()})
    art = build(output_specs=[("acc", (1, 8, 8, 8), "int32"), ("y", (1, 8, 8, 8), "float32")],
                reference_sample=None, extra={"note": np.int64(3)})
    m = art.save(tmp_path / "a") / "manifest.json"
    manifest = json.loads(m.read_text())
    assert [o["name"] for o in manifest["outputs"]] == ["acc", "y"]
    assert manifest["reference_sample"] is None and manifest["extra"] == {"note": 3}
    assert {p.name for p in (tmp_path / "a").iterdir()} == FILES - {"sample.bin"}
    with pytest.raises(ArtifactError, match="already holds an artifact; pass overwrite=True"):
        art.save(tmp_path / "a")


def test_standalone_runner_needs_neither_pqcompile_nor_torch(host_art, saved, tmp_path):
    device = Path(shutil.copytree(saved, tmp_path / "device"))  # outside the repository
    np.save(tmp_path / "x.npy", X2)
    proc = run_runner(device, "--input", tmp_path / "x.npy", "--output", tmp_path / "acc.npy",
                      "--output", tmp_path / "out.npy", "--check-sample", "--repeat", "3",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reference sample check passed: 2 output(s) match" in proc.stdout
    assert "median latency:" in proc.stdout
    assert "loaded: ['numpy', 'tvm']" in proc.stderr  # and neither torch nor pqcompile
    acc, out = host_art(X2)
    assert np.array_equal(np.load(tmp_path / "acc.npy"), acc)
    assert np.array_equal(np.load(tmp_path / "out.npy"), out)


def test_standalone_runner_fails_on_a_wrong_sample_or_a_modified_file(tmp_path):
    acc, out = reference(X)
    wrong = build(reference_sample=((X,), (acc + 1, out))).save(tmp_path / "wrong")
    proc = run_runner(wrong, "--check-sample", cwd=tmp_path)
    assert proc.returncode == 1
    assert "output 'output0' differs from the reference sample by up to 1 (allowed: exact)" \
        in proc.stderr
    lib = wrong / "lib.so"
    lib.write_bytes(lib.read_bytes() + b"\0")
    proc = run_runner(wrong, cwd=tmp_path)
    assert proc.returncode == 1 and "lib.so does not match the sha256" in proc.stderr


@pytest.mark.parametrize("target, arch", [("arm", "aarch64"), ("riscv/sifive-u74", "riscv64")])
def test_cross_builds_are_linked_for_their_arch_and_reproducible(target, arch, tmp_path):
    first, second = (build(target).save(tmp_path / name) for name in ("first", "second"))
    assert elf_arch(first / "lib.so") == arch
    assert json.loads((first / "manifest.json").read_text())["target"]["arch"] == arch
    for name in FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.fixture(scope="module")
def arm_art():
    return build("arm")


def test_an_arm_artifact_is_not_run_on_the_host(arm_art):
    if host_arch() == "aarch64":
        pytest.fail("this test assumes a non-aarch64 host")
    with pytest.raises(ArtifactError, match=r"for aarch64 .*runner\.py.*run_emulated"):
        arm_art(X)


@pytest.mark.slow
def test_arm_artifact_under_qemu_matches_the_host_build(arm_art, host_art, sysroot, tmp_path):
    directory = arm_art.save(tmp_path / "arm")
    assert elf_arch(directory / "lib.so") == "aarch64"
    assert arm_art.manifest["target"]["spec"]["cross_compiler"] == "aarch64-linux-gnu-gcc"
    acc, out = arm_art.run_emulated(X2, check_sample=True)  # runner.py under qemu-aarch64
    host_acc, host_out = host_art(X2)
    assert np.array_equal(acc, host_acc)
    assert np.array_equal(out, host_out)  # one float multiply: exactly rounded on both CPUs
