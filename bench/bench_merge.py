"""Benchmark `surgery merge` (the mean) against the plain way: load every state_dict, average, save.

What it measures
    Wall time and peak RSS of separate child processes that average ``--inputs``
    (4) checkpoints of one model into one .safetensors file. The inputs are made
    by a child process: the layout of ``_harness._layout`` (``--tensors`` float32
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

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _harness import (  # noqa: E402
    RUNS,
    _layout,
    _mib,
    busy_cpu_seconds,
    child_env,
    code_state,
    machine,
    own_cpu_seconds,
    run_all,
    summarize,
    write_results,
)

RESULTS = HERE / "results" / "merge.json"
TIME_TARGET = 1.0  # surgery/plain wall time at most this ("no slower")
MEMORY_TARGET = 0.25  # surgery/plain peak RSS at most this ("peak memory under a quarter")
OTHER_CPU_LIMIT = 0.05  # CPU-seconds used by other processes per second of timed runs, before a warning


def input_name(i: int) -> str:
    return f"in{i}.pth"


# --------------------------------------------------------------------------- inputs
# Child process (`--_generate`): this process never holds torch or the tensors.


def generate(folder: Path, n_inputs: int, size_mb: float, n_tensors: int) -> dict:
    import safetensors
    import torch

    t0 = time.perf_counter()
    layout = _layout(n_tensors, int(size_mb * 2**20))
    for i in range(n_inputs):
        torch.manual_seed(i)
        sd = {name: torch.empty(shape, dtype=torch.float32).normal_() for name, shape in layout}
        torch.save(sd, folder / input_name(i))
        del sd
    numel = sum(_numel(shape) for _, shape in layout)
    return {
        "torch_version": torch.__version__,
        "safetensors_version": safetensors.__version__,
        "inputs": n_inputs,
        "num_tensors": len(layout),
        "parameters": numel,
        "tensor_bytes_each": 4 * numel,
        "largest_tensor_bytes": 4 * max(_numel(shape) for _, shape in layout),
        "input_bytes": [(folder / input_name(i)).stat().st_size for i in range(n_inputs)],
        "dtype": "float32",
        "seconds_make": round(time.perf_counter() - t0, 2),
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


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
    inputs = [str(folder / input_name(i)) for i in range(n_inputs)]
    rows: list[dict] = []

    def add(label, kind, argv, out=None, note=""):
        rows.append(
            {
                "command": label,
                "kind": kind,
                "argv": [str(a) for a in argv],
                "outputs": [str(out)] if out else [],
                "note": note,
            }
        )

    names = " ".join(input_name(i) for i in range(n_inputs))
    out_s = folder / "surgery.safetensors"
    add(
        f"surgery merge {names} -o out.safetensors",
        "surgery",
        [py, "-m", "surgery", "merge", *inputs, "-o", out_s],
        out_s,
    )
    for mmap in ("no-mmap", "mmap"):
        out_p = folder / f"plain_{mmap}.safetensors"
        add(
            f"torch.load(mmap={mmap == 'mmap'}) x{n_inputs} + float64 mean + save_file",
            "plain" if mmap == "no-mmap" else "plain-mmap",
            [py, "-c", PLAIN, out_p, mmap, *inputs],
            out_p,
        )
    add("python -c 'import torch' [import floor]", "floor", [py, "-c", "import torch"])
    true = shutil.which("true")
    if true:
        add("true [measurement floor]", "launcher", [true], note="RSS inherited from the runner")
    return rows


# --------------------------------------------------------------------------- reporting


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| command | median wall s | peak RSS MiB | surgery/this: time | surgery/this: memory |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("failed"):
            wall, rss = f"FAILED ({r['failed']})", "-"
        else:
            wall, rss = f"{r['median_s']:.3f}", f"{_mib(r['max_rss_kib']):.1f}"
        lines.append(
            f"| `{r['command']}` | {wall} | {rss} | {_ratio(r.get('time_ratio'))} | "
            f"{_ratio(r.get('memory_ratio'))} |"
        )
    return "\n".join(lines)


def _shown(arg: str, folder: Path) -> str:
    """An argument as the JSON records it: the temporary folder left out, a script by its first line."""
    if arg.startswith(str(folder)):
        return Path(arg).name
    arg = arg.replace(str(folder), "DIR")
    return arg if "\n" not in arg else arg.splitlines()[0] + " ... (the script is in bench_merge.py)"


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {args[0]} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=4, help="how many checkpoints to average")
    parser.add_argument("--size-mb", type=float, default=256, help="MiB of float32 tensors in each input")
    parser.add_argument("--tensors", type=int, default=300, help="tensors in each input")
    parser.add_argument(
        "--env-as-is",
        action="store_true",
        help="run the commands in this environment exactly (by default they get a bytecode cache)",
    )
    parser.add_argument("--_generate", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--_check", metavar="JOB", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inputs < 2:
        parser.error("--inputs: at least 2")

    if args._generate:
        print(json.dumps(generate(Path(args._generate), args.inputs, args.size_mb, args.tensors)))
        return 0
    if args._check:
        print(json.dumps(check(json.loads(Path(args._check).read_text()))))
        return 0

    folder = Path(tempfile.mkdtemp(prefix="bench_merge_"))
    try:
        print(f"making {args.inputs} inputs in {folder} ...", flush=True)
        facts = _child(
            [
                "--_generate",
                str(folder),
                f"--inputs={args.inputs}",
                f"--size-mb={args.size_mb}",
                f"--tensors={args.tensors}",
            ]
        )
        print(
            f"  {facts['inputs']} x {facts['num_tensors']} tensors, {facts['tensor_bytes_each'] / 2**20:.1f} MiB "
            f"float32 each (largest tensor {facts['largest_tensor_bytes'] / 2**20:.1f} MiB), made in "
            f"{facts['seconds_make']} s",
            flush=True,
        )
        env, bytecode = child_env(folder, args.env_as_is)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # this checkout
        print(f"  bytecode cache for the commands: {bytecode}", flush=True)
        rows = commands(folder, args.inputs)
        code_before = code_state()
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        busy0, own0, wall0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        clear_refs_ok = run_all(rows, folder, env, sync=True)
        busy1, own1, wall1 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        load_after = Path("/proc/loadavg").read_text().split()[:3]
        code_after = code_state()
        load = {
            "wall_s": round(wall1 - wall0, 1),
            "benchmark_cpu_s": round(own1 - own0, 1),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        }
        if busy0 is not None and busy1 is not None:
            load["machine_busy_cpu_s"] = round(busy1 - busy0, 1)
            load["other_cpu_s"] = round(max(busy1 - busy0 - (own1 - own0), 0.0), 1)

        problems = summarize(rows, count_warmup=True)
        surgery = next(r for r in rows if r["kind"] == "surgery")
        aims = {}
        for kind in ("plain", "plain-mmap"):
            plain = next(r for r in rows if r["kind"] == kind)
            if surgery.get("failed") or plain.get("failed"):
                continue
            time_ratio = surgery["median_s"] / plain["median_s"]
            memory_ratio = surgery["max_rss_kib"] / plain["max_rss_kib"]
            plain.update(time_ratio=time_ratio, memory_ratio=memory_ratio)
            aims[kind] = {
                "time_ratio": time_ratio,
                "time_ok": time_ratio <= TIME_TARGET,
                "memory_ratio": memory_ratio,
                "memory_ok": memory_ratio <= MEMORY_TARGET,
                "judged": kind == "plain",
            }

        print("checking the outputs tensor by tensor ...", flush=True)
        job = folder / "check.json"
        plain_outs = {r["kind"]: r["outputs"][0] for r in rows if r["kind"].startswith("plain")}
        job.write_text(json.dumps({"surgery": surgery["outputs"][0], "plain": plain_outs}))
        checked = _child(["--_check", str(job)])
        if not checked["ok"]:
            problems.append(f"check: {checked}")

        mach = machine(folder, facts)
        print()
        print(
            f"{mach['nproc']} CPUs ({mach['cpu']}), {mach['mem_gib']} GiB, {mach['tmp_filesystem']} temp folder; "
            f"Python {mach['python']}, torch {mach['torch']}, safetensors {mach['safetensors']}. "
            f"Median of {RUNS} runs after 1 warm-up; inputs warm in the page cache; outputs deleted and sync() "
            "before every run."
        )
        print(f"Bytecode cache: {bytecode}.")
        changed = code_before["surgery_changed_files"]
        print(
            f"surgery at commit {(code_before['commit'] or '?')[:10]}"
            + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")
            + "."
        )
        print(f"Load average (1, 5, 15 min) before {' '.join(load_before)}, after {' '.join(load_after)}.")
        other = load.get("other_cpu_s")
        if other is not None:
            print(
                f"CPU during the timed runs: {load['benchmark_cpu_s']} s by the benchmark's commands, "
                f"{other} s by anything else, in {load['wall_s']} s of wall time."
            )
            if other > OTHER_CPU_LIMIT * load["wall_s"]:
                problems.append(
                    f"other processes used {other} CPU-seconds during the {load['wall_s']} s of timed runs: "
                    "the times are disturbed, rerun on a quiet machine"
                )
        if code_after != code_before:
            problems.append("surgery's code changed while the benchmark ran: rerun it")
        print()
        print(table(rows))
        print()
        print(
            "- ratios, on each plain row: surgery's median wall time / this row's, surgery's peak RSS / this "
            "row's (below 1: surgery faster, smaller); the aim is judged against mmap=False."
        )
        if not clear_refs_ok:
            print("- WARNING: /proc/self/clear_refs not writable: RSS rows include the runner's peak RSS.")
        print("- spread of the timed runs (fastest - slowest wall s):")
        for r in rows:
            walls = sorted(run["wall_s"] for run in r["runs"])
            print(f"  - `{r['command']}`: {walls[0]:.3f} - {walls[-1]:.3f}")
        for kind, a in aims.items():
            verdict = (
                f"time {'met' if a['time_ok'] else 'MISSED'} (<= {TIME_TARGET:.2f}), "
                f"memory {'met' if a['memory_ok'] else 'MISSED'} (<= {MEMORY_TARGET:.2f})"
                if a["judged"]
                else "shown, not judged"
            )
            print(
                f"- aim vs {kind}: time ratio {a['time_ratio']:.3f}, memory ratio {a['memory_ratio']:.3f}: "
                f"{verdict}"
            )
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
        for p in problems:
            print(f"- PROBLEM: {p}")

        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "benchmark": "merge",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": mach,
            "code": {"before": code_before, "after": code_after},
            "cpu_during_runs": load,
            "params": {
                "inputs": args.inputs,
                "size_mb": args.size_mb,
                "tensors": args.tensors,
                "method": "mean",
                "runs": RUNS,
                "warmup_runs": 1,
                "env_as_is": args.env_as_is,
                "bytecode_cache": bytecode,
            },
            "inputs": facts,
            "warm_cache": True,
            "between_runs": "the command's output deleted, then sync(), outside the timing",
            "peak_rss_method": "os.wait4 ru_maxrss of each child, spawned by a lean `python -S -I` runner with fork "
            "and /proc/self/clear_refs 5 before exec",
            "clear_refs_writable": clear_refs_ok,
            "rows": [
                {
                    "command": r["command"],
                    "kind": r["kind"],
                    "argv": [_shown(a, folder) for a in r["argv"]],
                    "note": r["note"],
                    "median_wall_s": r["median_s"],
                    "peak_rss_kib": r["max_rss_kib"],
                    "peak_rss_mib": round(_mib(r["max_rss_kib"]), 2),
                    "surgery_time_ratio": r.get("time_ratio"),
                    "surgery_memory_ratio": r.get("memory_ratio"),
                    "failed": r.get("failed"),
                    "runs": r["runs"],
                    "warmup": r["warmup"],
                }
                for r in rows
            ],
            "aim": {
                "time_ratio_at_most": TIME_TARGET,
                "memory_ratio_at_most": MEMORY_TARGET,
                "results": aims,
            },
            "check": checked,
            "problems": problems,
            "table_markdown": table(rows),
        }
        return write_results(RESULTS, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
