"""Benchmark `surgery merge` (the mean) against the plain way: load every state_dict, average, save.

What it measures
    Wall time and peak RSS of separate child processes that average ``--inputs``
    (4) checkpoints of one model into one .safetensors file. The inputs are made
    by a child process: the layout of ``_harness.layout`` (``--tensors`` float32
    tensors, width chosen to come closest to ``--size-mb`` MiB each, default 256),
    input i filled with ``torch.manual_seed(i)`` normal values, saved with
    ``torch.save`` as ``in0.pth`` ... ``in3.pth``.

    Rows:

    * surgery::

          python -m surgery merge in0.pth in1.pth in2.pth in3.pth -o surgery.safetensors

    * the plain way, twice: ``mmap=False`` and ``mmap=True``, with the arithmetic
      surgery documents (float64 sum in input order, divided by the count, cast
      back), so that both outputs can be compared bit for bit::

          sds = [torch.load(p, map_location="cpu", mmap=mmap, weights_only=True) for p in inputs]
          out = {}
          for k, t in sds[0].items():
              total = t.to(torch.float64, copy=True)
              for sd in sds[1:]:
                  total += sd[k]
              out[k] = total.div_(len(sds)).to(t.dtype)
          safetensors.torch.save_file(out, path)

    * the floors: ``python -c 'import torch'`` and ``true`` (the measurement floor).

    Measured with ``_harness.py`` as bench_rules.py: one warm-up then 3 timed runs
    round-robin, each command in its own child; outputs deleted and ``sync()``
    before each run, outside the timing; inputs warm in the page cache. After the
    runs a checker child compares surgery's output with each plain output tensor
    by tensor (same keys, dtypes, shapes; bit-identical, else the largest absolute
    and ulp-relative difference). A failed command, a mismatch beyond float32
    rounding, other processes using more than 5% of a CPU or surgery's code
    changing mid-run is a PROBLEM (exit code 1).

The aim (issue 14, "Memory and speed")
    surgery no slower than the plain way (time ratio <= 1.0) and under a quarter of
    its peak memory (memory ratio <= 0.25), judged against the plain ``mmap=False``
    row; the ``mmap=True`` ratios are shown too.

How to run
    python bench/bench_merge.py                                   # 4 x 256 MiB, a few minutes
    python bench/bench_merge.py --size-mb 16 --tensors 60         # quick check

    It prints a Markdown table and writes the same numbers to bench/results/merge.json.
    Inputs and outputs go to a fresh temporary folder (about inputs + 3 outputs) removed at the end.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _harness as harness  # noqa: E402

RESULTS = HERE / "results" / "merge.json"
TIME_TARGET = 1.0  # surgery/plain wall time at most this ("no slower")
MEMORY_TARGET = 0.25  # surgery/plain peak RSS at most this ("peak memory under a quarter")


def input_name(i: int) -> str:
    return f"in{i}.pth"


# --------------------------------------------------------------------------- inputs
# Child process (`--_generate`): this process never holds torch or the tensors.


def generate(folder: Path, n_inputs: int, size_mb: float, n_tensors: int) -> dict:
    import safetensors
    import torch

    t0 = time.perf_counter()
    layout = harness.layout(n_tensors, int(size_mb * 2**20))
    for i in range(n_inputs):
        torch.manual_seed(i)
        sd = {name: torch.empty(shape, dtype=torch.float32).normal_() for name, shape in layout}
        torch.save(sd, folder / input_name(i))
        del sd
    numel = sum(math.prod(shape) for _, shape in layout)
    return {
        "torch_version": torch.__version__,
        "safetensors_version": safetensors.__version__,
        "inputs": n_inputs,
        "num_tensors": len(layout),
        "parameters": numel,
        "tensor_bytes_each": 4 * numel,
        "largest_tensor_bytes": 4 * max(math.prod(shape) for _, shape in layout),
        "input_bytes": [(folder / input_name(i)).stat().st_size for i in range(n_inputs)],
        "dtype": "float32",
        "seconds_make": round(time.perf_counter() - t0, 2),
    }


# --------------------------------------------------------------------------- the plain way

PLAIN = """\
import sys, torch, safetensors.torch
out, mmap, *inputs = sys.argv[1:]
sds = [torch.load(p, map_location="cpu", mmap=mmap == "mmap", weights_only=True) for p in inputs]
merged = {}
for k, t in sds[0].items():  # surgery's arithmetic: float64 sum in input order, / count, cast back
    total = t.to(torch.float64, copy=True)
    for sd in sds[1:]:
        total += sd[k]
    merged[k] = total.div_(len(sds)).to(t.dtype)
safetensors.torch.save_file(merged, out)
"""

# --------------------------------------------------------------------------- checking
# Child process (`--_check`): the outputs memory-mapped, one tensor at a time.


def check(job: dict) -> dict:
    """surgery's output against each plain output: keys, dtypes, shapes, bytes (else how far apart)."""
    import torch
    from safetensors import safe_open

    s = safe_open(job["surgery"], "pt")
    s_names = set(s.keys())
    res: dict = {"num_surgery_tensors": len(s_names)}
    ok = True
    for label, path in job["plain"].items():
        p = safe_open(path, "pt")
        p_names = set(p.keys())
        identical, differ, max_abs, max_ulps = 0, [], 0.0, 0.0
        for name in sorted(s_names & p_names):
            a, b = s.get_tensor(name), p.get_tensor(name)
            if a.dtype != b.dtype or a.shape != b.shape:
                differ.append(name)
                ok = False
                continue
            if torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b):
                identical += 1
                continue
            differ.append(name)
            diff = (a.double() - b.double()).abs()
            ulp = torch.finfo(a.dtype).eps * torch.maximum(a.double().abs(), b.double().abs()).clamp(
                min=torch.finfo(a.dtype).tiny
            )
            max_abs = max(max_abs, diff.max().item())
            max_ulps = max(max_ulps, (diff / ulp).max().item())
        keys_equal = s_names == p_names
        ok = ok and keys_equal and max_ulps <= 1.0
        res[label] = {
            "keys_equal": keys_equal,
            "only_surgery": sorted(s_names - p_names),
            "only_plain": sorted(p_names - s_names),
            "identical": identical,
            "differ": differ,
            "max_abs_difference": max_abs,
            "max_difference_ulps": max_ulps,
        }
    res["ok"] = ok
    return res


# --------------------------------------------------------------------------- the rows


def commands(folder: Path, n_inputs: int) -> list[dict]:
    py = sys.executable
    inputs = [folder / input_name(i) for i in range(n_inputs)]
    names = " ".join(input_name(i) for i in range(n_inputs))
    out_s = folder / "surgery.safetensors"
    rows = [
        harness.row(
            f"surgery merge {names} -o out.safetensors",
            "surgery",
            [py, "-m", "surgery", "merge", *inputs, "-o", out_s],
            out_s,
        )
    ]
    for mmap in ("no-mmap", "mmap"):
        out_p = folder / f"plain_{mmap}.safetensors"
        rows.append(
            harness.row(
                f"torch.load(mmap={mmap == 'mmap'}) x{n_inputs} + float64 mean + save_file",
                "plain" if mmap == "no-mmap" else "plain-mmap",
                [py, "-c", PLAIN, out_p, mmap, *inputs],
                out_p,
            )
        )
    rows.append(harness.row("python -c 'import torch' [import floor]", "floor", [py, "-c", "import torch"]))
    return rows + harness.measurement_floor()


# --------------------------------------------------------------------------- the run


def main() -> int:
    parser = harness.benchmark_parser(__doc__, "generate", "check")
    parser.add_argument("--inputs", type=int, default=4, help="how many checkpoints to average")
    parser.add_argument("--size-mb", type=float, default=256, help="MiB of float32 tensors in each input")
    parser.add_argument("--tensors", type=int, default=300, help="tensors in each input")
    args = parser.parse_args()
    if args.inputs < 2:
        parser.error("--inputs: at least 2")
    if args._generate:
        return harness.reply(generate(Path(args._generate), args.inputs, args.size_mb, args.tensors))
    if args._check:
        return harness.reply(check(json.loads(Path(args._check).read_text())))

    with tempfile.TemporaryDirectory(prefix="bench_merge_", ignore_cleanup_errors=True) as tmp:
        folder = Path(tmp)
        print(f"making {args.inputs} inputs in {folder} ...", flush=True)
        sizes = [f"--inputs={args.inputs}", f"--size-mb={args.size_mb}", f"--tensors={args.tensors}"]
        facts = harness.child(__file__, ["--_generate", str(folder), *sizes])
        print(
            f"  {facts['inputs']} x {facts['num_tensors']} tensors, {facts['tensor_bytes_each'] / 2**20:.1f} MiB "
            f"float32 each (largest tensor {facts['largest_tensor_bytes'] / 2**20:.1f} MiB), made in "
            f"{facts['seconds_make']} s",
            flush=True,
        )
        env, bytecode = harness.child_env(folder, args.env_as_is, this_checkout=True)
        print(f"  bytecode cache for the commands: {bytecode}", flush=True)
        rows = commands(folder, args.inputs)
        watch = harness.Watch()
        clear_refs_ok = harness.run_all(rows, folder, env, sync=True)
        watch.stop()

        problems = harness.summarize(rows, count_warmup=True)
        by_kind = {r["kind"]: r for r in rows}
        aims = harness.against_plains(by_kind, ("plain", "plain-mmap"), TIME_TARGET, MEMORY_TARGET)

        print("checking the outputs tensor by tensor ...", flush=True)
        plain_outs = {kind: by_kind[kind]["outputs"][0] for kind in ("plain", "plain-mmap")}
        checked = harness.check_in_child(
            __file__, folder, {"surgery": by_kind["surgery"]["outputs"][0], "plain": plain_outs}
        )
        if not checked["ok"]:
            problems.append(f"check: {checked}")

        mach = harness.machine(folder, facts)
        harness.print_context(mach, bytecode, watch)
        problems += watch.problems()
        print()
        print(harness.ratio_table(rows))
        print()
        harness.print_ratio_note("mmap=False")
        harness.print_clear_refs_warning(clear_refs_ok)
        harness.print_spread(rows)
        harness.print_aims(aims, TIME_TARGET, MEMORY_TARGET)
        for label in plain_outs:
            c = checked[label]
            print(
                f"- check surgery vs {label}: {c['identical']}/{checked['num_surgery_tensors']} tensors "
                f"bit-identical, keys equal: {c['keys_equal']}"
                + (
                    f"; the others differ by at most {c['max_abs_difference']:.3g} "
                    f"({c['max_difference_ulps']:.2f} ulp)"
                    if c["differ"]
                    else ""
                )
            )

        return harness.finish(
            RESULTS,
            {
                **harness.results_head("merge", mach, watch),
                "params": {
                    "inputs": args.inputs,
                    "size_mb": args.size_mb,
                    "tensors": args.tensors,
                    "method": "mean",
                    **harness.measuring_params(args.env_as_is, bytecode),
                },
                "inputs": facts,
                **harness.measuring_method(clear_refs_ok),
                **harness.ratio_fields(rows, folder, aims, TIME_TARGET, MEMORY_TARGET),
                "check": checked,
                "problems": problems,
                "table_markdown": harness.ratio_table(rows),
            },
        )


if __name__ == "__main__":
    sys.exit(main())
