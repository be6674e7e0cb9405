"""Where an aarch64 artifact's instructions go: guest instructions per kernel of one inference.

The profiling plugin (``scripts/qemu_plugin/pqprof.c``, built here into the plugin cache next to
``libpqcount.so`` on first use) counts each translated block's executions between the marks
of :func:`pqcompile.targets.insn_count.count_instructions` (the same single-threaded process,
the same per-inference count: call ``runs[1]`` is the one profiled). Blocks are mapped to the
library by the executable mapping that holds most of them, and to kernels by the library's
symbols: a kernel's parallel body is a local function without a symbol, so each function
whose code takes a body's address (``adrp``/``add``) gives it its name (``name/body``).

    python benchmarks/aarch64_profile.py ARTIFACT_DIR [--cpu cortex-a76] [--top 30]
    python benchmarks/aarch64_profile.py --minilm arm-dotprod   # the sentence encoder

``--minilm TARGET`` builds paraphrase-MiniLM-L3-v2 (real checkpoint) at ``--budget``
(``bops=16x``: int8, the product benchmark's int8 row; ``macs=2x``: its pruned architecture),
calibrated on 16 Lee background documents, no fine-tuning, and profiles it on the first Lee
document, 128 tokens. Layer names are folded (``bert_encoder_layer_N_`` -> ``L_``), so a row
sums a kernel over layers.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pqcompile.targets.insn_count import count_instructions, default_plugin_path
from pqcompile.targets.ort_insn_count import qemu_cpu

SOURCE = Path(__file__).resolve().parents[1] / "scripts" / "qemu_plugin" / "pqprof.c"


def build_plugin() -> Path:
    """``libpqprof.so`` next to ``libpqcount.so`` (built by ``scripts/setup.sh``, whose copy
    of ``qemu-plugin.h`` it compiles against); rebuilt when the source is newer."""
    cache = default_plugin_path().parent
    header = cache / "src" / "qemu-plugin.h"
    if not header.exists():
        raise SystemExit(f"{header} is missing: build the counting plugin first "
                         f"(bash scripts/build_insn_plugin.sh)")
    out = cache / "libpqprof.so"
    if not out.exists() or out.stat().st_mtime < SOURCE.stat().st_mtime:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "glib-2.0"],
                               capture_output=True, text=True, check=True).stdout.split()
        subprocess.run(["gcc", "-O2", "-fPIC", "-shared", "-Wall", "-Wno-unused-parameter",
                        "-I", str(header.parent), str(SOURCE), "-o", str(out), *flags],
                       check=True)
    return out


def kernel_starts(lib: Path) -> list[tuple[int, str]]:
    """``(offset, name)`` of each function and parallel body of ``lib``, sorted."""
    dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", str(lib)],
                         capture_output=True, text=True, check=True).stdout
    starts, refs, func, page = {}, collections.defaultdict(set), None, {}
    for line in dis.splitlines():
        m = re.match(r"^([0-9a-f]+) <(.+)>:$", line)
        if m:
            func = m.group(2)
            starts[int(m.group(1), 16)] = func
            continue
        m = re.match(r"^\s*[0-9a-f]+:\s+(\S+)\s+(.*)$", line)
        if not m or func is None:
            continue
        op, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        if op == "adrp" and len(args) == 2:
            page[args[0]] = int(args[1].split()[0], 16)
            continue
        if op == "add" and len(args) == 3 and args[1] in page and args[2].startswith("#0x"):
            refs[func].add(page[args[1]] + int(args[2][1:], 16))
        # a register written since its adrp holds no page (a loop's `add x9, x9, #0x1`)
        for a in args[:2 if op.startswith("ldp") else 1]:
            page.pop("x" + a[1:] if a[:1] == "w" else a, None)
    end = max(starts) + 1
    bodies = {a: f"{f}/body" for f, rs in refs.items() for a in rs
              if a not in starts and min(starts) < a < end + (1 << 16)}
    return sorted({**starts, **bodies}.items())


def profile(artifact: Path, cpu: str, inputs=None, timeout: float = 3600) -> dict[str, int]:
    """Instructions of one inference by kernel (``(outside the library)`` for the rest)."""
    plugin = build_plugin()
    with tempfile.TemporaryDirectory(prefix="pqprof-") as tmp:
        out = Path(tmp) / "profile.txt"
        env = {"PQCOMPILE_INSN_PLUGIN": str(plugin), "PQCOUNT_PROFILE": str(out)}
        with mock.patch.dict(os.environ, env):
            count_instructions(str(artifact), runs=(1, 2), timeout=timeout, cpu=cpu,
                               **({"inputs": inputs} if inputs is not None else {}))
        maps, blocks = [], []
        for line in out.read_text().splitlines():
            p = line.split()
            if p[0] == "map":
                maps.append((int(p[1], 16), int(p[2], 16)))
            else:
                blocks.append((int(p[1], 16), int(p[2]) * int(p[3])))
    held = collections.Counter()
    for pc, n in blocks:
        for a, size in maps:
            if a <= pc < a + size:
                held[a, size] += n
    base, size = max(held, key=held.get)
    starts = kernel_starts(artifact / "lib.so")
    offsets = [a for a, _ in starts]
    per: collections.Counter = collections.Counter()
    for pc, n in blocks:
        i = bisect.bisect_right(offsets, pc - base) - 1
        inside = base <= pc < base + size and i >= 0
        name = starts[i][1] if inside else "(outside the library)"
        name = re.sub(r"bert_encoder_layer_\d+_", "L_", name.removeprefix("__tvm_ffi_"))
        per[re.sub(r"/body$", "", name)] += n
    return dict(per)


def minilm_artifact(target: str, directory: Path, budget: str = "bops=16x"):
    """The MiniLM-L3 artifact for ``target`` at ``budget`` (int8 unless a MAC budget prunes
    it; no fine-tuning: the pruned architecture is the ILP's) and its first Lee document's
    inputs."""
    import real_transformers as rt
    from product_text import CALIBRATION, INPUTS

    from pqcompile.api import compile

    model, corpus, tok = rt.minilm_l3(), rt.lee_corpus(), rt.tokenizer()
    enc = rt.tokenize(list(corpus.documents), 128, tok)
    tuning = rt.tokenize(list(rt.lee_background()), 128, tok)
    docs = [{k: tuning[k][i:i + 1] for k in INPUTS} for i in range(CALIBRATION)]
    c = compile(model, (tuning["input_ids"][:1], tuning["attention_mask"][:1]), target="host",
                budget=budget, data=docs, calibration_batches=CALIBRATION,
                sensitivity_batches=8, observer="percentile", pareto_points=0,
                bit_options=[(8, 8)])
    shutil.rmtree(directory, ignore_errors=True)
    c.retarget(target).save(directory)
    return [enc[k][:1].numpy() for k in INPUTS]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", nargs="?", type=Path, help="an aarch64 artifact directory")
    ap.add_argument("--minilm", metavar="TARGET", help="build MiniLM-L3 int8 for TARGET")
    ap.add_argument("--budget", default="bops=16x",
                    help="compile() budget of the --minilm build (e.g. macs=2x)")
    ap.add_argument("--cpu", help="qemu CPU model (default: the target's class)")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    inputs = None
    with tempfile.TemporaryDirectory(prefix="pqprof-art-") as tmp:
        if args.minilm:
            artifact, cpu = Path(tmp) / "minilm", args.cpu or qemu_cpu(args.minilm)
            inputs = minilm_artifact(args.minilm, artifact, args.budget)
        elif args.artifact:
            artifact, cpu = args.artifact, args.cpu or "cortex-a76"
        else:
            ap.error("give an artifact directory or --minilm TARGET")
        per = profile(artifact, cpu, inputs)
    total = sum(per.values())
    print(f"{total / 1e6:.2f} M instructions in one inference ({cpu})")
    for name, n in sorted(per.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{n / 1e6:9.2f} M  {100 * n / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
