"""The command line: analyze a model, machine-readable output, clear errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from pqcompile.cli import main


def test_analyze_json(capsys):
    assert main(["analyze", "--model", "pqcompile.models:resnet20",
                 "--input-shape", "1,3,32,32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["macs"] == 40813184
    assert data["totals"]["bops"] == 40813184 * 1024
    groups = data["channel_groups"]
    # ResNet-20: stem+stage-1 residual group, stage 2 and 3 residual groups, 9 block-internal
    # groups, and the classifier (unprunable: it is the model output).
    assert len(groups) == 13 and sum(g["prunable"] for g in groups) == 12
    assert [g["size"] for g in groups if not g["prunable"]] == [10]


def test_analyze_text_entry_point():
    proc = subprocess.run([sys.executable, "-m", "pqcompile.cli", "analyze", "--model",
                           "pqcompile.models:resnet20", "--input-shape", "1,3,32,32"],
                          capture_output=True, text=True, check=True)
    assert "40.81 M MACs" in proc.stdout and "channel groups: 13 (12 prunable" in proc.stdout


def test_errors(capsys):
    assert main(["analyze", "--model", "nope.module:f", "--input-shape", "1,3"]) == 2
    assert "cannot import 'nope.module'" in capsys.readouterr().err
    assert main(["analyze", "--model", "torchvision.models", "--input-shape", "1,3"]) == 2
    assert "expected 'package.module:factory'" in capsys.readouterr().err
    assert main(["analyze", "--model", "pqcompile.models:resnet20", "--input-shape", "1,x"]) == 2
    assert "positive integers" in capsys.readouterr().err
    assert main(["analyze", "--model", "pqcompile.models:resnet20",
                 "--input-shape", "1,3,32"]) == 2
    assert "example inputs do not fit the model" in capsys.readouterr().err


def test_compile_tiny_model(tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["compile", "--model", "pqcompile.models:resnet20", "--input-shape", "1,3,32,32",
                 "--target", "arm", "--budget", "bops=40x", "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["bop_reduction"] >= 40
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["arch"] == "aarch64"
    assert manifest["totals"]["bops"] == data["totals"]["bops"] <= 40813184 * 1024 / 40
    assert main(["compile", "--model", "pqcompile.models:resnet20", "--input-shape", "1,3,32,32",
                 "--budget", "bops=5000x", "--out", str(tmp_path / "x")]) == 2
    assert "smallest reachable" in capsys.readouterr().err


def test_compile_with_data_finetunes_and_reports_progress(tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["compile", "--model", "solver_models:DigitsCNN", "--input-shape", "1,1,8,8",
                 "--data", "solver_models:digits_train", "--finetune-steps", "4",
                 "--target", "host", "--budget", "bops=30x", "--out", str(out), "--json",
                 "--onnx", str(tmp_path / "m.onnx"), "--plots", str(tmp_path / "plots")]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= {n.op_type for n in model.graph.node}
    assert sorted(Path(p).name for p in data["plots"]) == ["layers.png", "pareto.png"]
    assert data["totals"]["bop_reduction"] >= 30
    assert data["calibration"] == "8 batches of data"
    # the pipeline's stages that apply (no latency table without a latency budget)
    # (fine-tuning prunes and folds: those stages do not apply)
    stages = ["[1/10] trace", "[4/10] costs", "[5/10] sensitivity (16 batches)",
              "[6/10] solve (ilp)", "[7/10] fine-tune", "[8/10] quantize (minmax)",
              "[9/10] lower (host)", "[10/10] build (host)"]
    for stage in stages:
        assert f"{stage} done in" in captured.err
    for bar in ("qat 4/4", "sensitivity 16/16", "pareto 4/4"):
        assert f"{bar} [####################]" in captured.err
    assert len(data["candidates"]) >= 5 and data["candidates"][-1]["source"] == "chosen"
    assert main(["compile", "--model", "solver_models:DigitsCNN", "--input-shape", "1,1,8,8",
                 "--finetune-steps", "4", "--budget", "bops=30x", "--out", str(out)]) == 2
    assert "--finetune-steps needs --data" in capsys.readouterr().err
    assert main(["compile", "--model", "solver_models:DigitsCNN", "--input-shape", "1,1,8,8",
                 "--data", "solver_models:nothing", "--budget", "bops=30x",
                 "--out", str(out)]) == 2
    assert "--data 'solver_models:nothing': solver_models has no callable 'nothing'" \
        in capsys.readouterr().err


def test_help_and_argument_errors_import_neither_torch_nor_tvm():
    code = ("import sys\nfrom pqcompile.cli import main\n"
            "for argv in (['--help'], ['compile', '--help'], ['compile', '--model', 'x']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'tvm', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    for option in ("--seed", "--overwrite", "--json", "--input FILE.npy"):
        assert re.search(re.escape(option) + r"\s+\S", proc.stdout), option  # each has help
    assert "board" in proc.stdout


def test_random_calibration_and_random_weights_warn(tmp_path, capsys):
    assert main(["analyze", "--model", "torchvision.models:squeezenet1_0",
                 "--input-shape", "1,3,32,32", "--json"]) == 0
    assert "builds the architecture with random weights" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    assert main(["compile", "--model", "solver_models:DigitsCNN", "--input", str(tmp_path / "y"),
                 "--budget", "bops=30x", "--out", str(tmp_path / "a")]) == 2
    assert "--input" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["compile", "--model", "solver_models:DigitsCNN", "--input-shape", "1,1,8,8",
                 "--budget", "bops=5000x", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "warning: no --data and no --input: activations are calibrated on a RANDOM normal " \
           "tensor of shape (1, 1, 8, 8) (seed 0)" in err
