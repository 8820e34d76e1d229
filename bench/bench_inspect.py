"""Benchmark `surgery inspect` against the plain ways of reading a checkpoint.

What it measures
    Wall time and peak RSS of separate child processes that read a ~1 GB
    checkpoint (a few hundred float32 tensors of realistic shapes: conv and
    linear weights, biases, norm parameters), saved three ways:

    * torch zip     ``torch.save(sd, p)``
    * torch legacy  ``torch.save(sd, p, _use_new_zipfile_serialization=False)``
    * safetensors   ``safetensors.torch.save_file(sd, p)``

    For each format it runs ``python -m surgery inspect PATH --json`` and the
    plain alternatives:

    * torch zip: ``torch.load(p, mmap=True, weights_only=True)``;
    * torch legacy: ``torch.load(p, weights_only=True)`` -- torch cannot mmap
      the legacy format, so this one reads all tensor data;
    * safetensors: ``safe_open(p, "pt").keys()`` (header only, the plain way to
      list a safetensors file) and ``safetensors.torch.load_file(p)`` (the
      torch-style full load);

    plus ``python -c pass``, the interpreter start-up floor.

    Every command runs once as a warm-up and then 3 times (round-robin over
    the commands); the table reports the median wall time and the max peak
    RSS. Page cache is not dropped (that needs root), so every command is
    measured warm: the checkpoint files are already in the page cache.

Start-up
    A second table sets surgery beside the interpreter's own start, the aims
    being ``surgery inspect`` at most 4x and ``surgery --help`` at most 3x
    ``python -c pass`` (the interpreter as the user starts it, site-packages
    and their .pth files included; ``python -S -c pass`` is shown too): the
    five commands ``python -c pass``, ``python -S -c pass``, ``surgery --help``,
    ``surgery inspect --json BIG`` and ``surgery inspect BIG`` (plain text into
    a pipe), BIG being the torch zip above, run interleaved (round-robin) after
    one warm-up, ``--startup-runs`` times each (20), and each ratio is the
    median wall time over ``python -c pass``'s median. surgery runs as
    ``python -m surgery`` (the code of the folder the script is run from).
    The machine's load average before and after, and the CPU time other
    processes used meanwhile, are printed with the table: on a shared machine
    read the ratios, which the interleaving keeps fair, more than the times.

How peak RSS is measured
    ``os.wait4(pid, 0)`` on a ``subprocess.Popen`` returns the child's own
    ``ru_maxrss`` (KiB on Linux). On Linux a child's ``ru_maxrss`` also takes
    in the RSS of the address space it ran in before ``exec``: with vfork
    (Python's default) that is the *parent's* peak RSS. So this script never
    imports torch itself (a child process makes the checkpoints), the timed
    runs are launched by a lean runner interpreter (``python -S -I``) that
    spawns with fork and resets the forked child's peak RSS
    (``/proc/self/clear_refs`` ``5``) just before ``exec``. What remains of the
    runner is reported as the measurement floor (``true`` launched the same
    way, about 8 MiB); no row can read below it.

Bytecode
    If PYTHONDONTWRITEBYTECODE is set (as in some containers), an editable
    install without __pycache__ (surgery here) is compiled from source at every
    run while torch was byte-compiled by pip. So by default the commands run
    with PYTHONDONTWRITEBYTECODE unset and a fresh PYTHONPYCACHEPREFIX in the
    temporary folder, filled by the warm-up runs: every command runs from
    cached bytecode, as after a normal install, and no source tree is written.
    ``--env-as-is`` runs the commands in the caller's environment unchanged.

How to run
    python bench/bench_inspect.py                  # 1.2 GB, 400 tensors
    python bench/bench_inspect.py --size-gb 0.1 --tensors 50   # quick check
    python bench/bench_inspect.py --env-as-is      # no bytecode-cache fix-up

    It prints a Markdown table and writes the same numbers to
    bench/results/inspect.json. The checkpoints go to a fresh temporary folder
    (about 3x --size-gb of disk) that is removed at the end.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _harness as harness  # noqa: E402

RESULTS = HERE / "results" / "inspect.json"
SPEED_TARGET = 20.0  # surgery at least this many times faster than the plain load
RSS_TARGET_BYTES = 60_000_000  # surgery peak RSS under 60 MB (57.2 MiB)
STARTUP_RUNS = 20
STARTUP_AIMS = {"help": 3.0, "inspect": 4.0}  # at most this many times `python -c pass`

FORMATS = {
    "torch-zip": "model_zip.pth",
    "torch-legacy": "model_legacy.pth",
    "safetensors": "model.safetensors",
}


# --------------------------------------------------------------------------- checkpoint making
# Runs in a child process (`--_generate`), so that this process never holds torch or
# the tensors: its RSS would leak into every child's ru_maxrss (see the docstring).


def generate(folder: Path, size_gb: float, n_tensors: int) -> dict:
    """Make the state_dict and save it in the three formats; return facts about it."""
    import safetensors
    import safetensors.torch
    import torch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    sd = {
        name: torch.empty(shape, dtype=torch.float32).normal_()
        for name, shape in harness.layout(n_tensors, int(size_gb * 1e9))
    }
    t_make = time.perf_counter() - t0
    paths = {fmt: folder / name for fmt, name in FORMATS.items()}
    t0 = time.perf_counter()
    torch.save(sd, paths["torch-zip"])
    torch.save(sd, paths["torch-legacy"], _use_new_zipfile_serialization=False)
    safetensors.torch.save_file(sd, str(paths["safetensors"]))
    t_save = time.perf_counter() - t0
    shapes = [tuple(t.shape) for t in sd.values()]
    return {
        "num_tensors": len(sd),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in sd.values()),
        "largest_tensor": max(shapes, key=math.prod),
        "example_shapes": {k: list(v.shape) for k, v in list(sd.items())[:12]},
        "file_bytes": {fmt: p.stat().st_size for fmt, p in paths.items()},
        "torch_version": torch.__version__,
        "safetensors_version": safetensors.__version__,
        "seconds_make": round(t_make, 2),
        "seconds_save": round(t_save, 2),
    }


def commands(paths: dict[str, Path]) -> list[dict]:
    py = sys.executable
    rows: list[dict] = []

    def add(fmt: str, label: str, kind: str, argv: list[str], note: str = "") -> None:
        rows.append(harness.row(label, kind, argv, note=note, format=fmt))

    for fmt, path in paths.items():
        p = str(path)
        add(fmt, "surgery inspect --json", "surgery", [py, "-m", "surgery", "inspect", p, "--json"])
        if fmt == "torch-zip":
            add(
                fmt,
                "torch.load(mmap=True, weights_only=True)",
                "plain",
                [py, "-c", "import torch,sys; torch.load(sys.argv[1], mmap=True, weights_only=True)", p],
            )
        elif fmt == "torch-legacy":
            add(
                fmt,
                "torch.load(weights_only=True) [no mmap]",
                "plain",
                [py, "-c", "import torch,sys; torch.load(sys.argv[1], weights_only=True)", p],
                "torch cannot mmap the legacy format: this reads all tensor data",
            )
        else:
            add(
                fmt,
                "safe_open(p, 'pt').keys() [header only]",
                "plain-header",
                [
                    py,
                    "-c",
                    "from safetensors import safe_open; import sys; f = safe_open(sys.argv[1], 'pt'); list(f.keys())",
                    p,
                ],
            )
            add(
                fmt,
                "safetensors.torch.load_file(p)",
                "plain",
                [py, "-c", "import safetensors.torch, sys; safetensors.torch.load_file(sys.argv[1])", p],
                "torch-style full load",
            )
    add("-", "python -c pass [start-up floor]", "floor", [py, "-c", "pass"])
    return rows + harness.measurement_floor(format="-")


def startup_commands(big: Path) -> list[dict]:
    """The start-up rows: the interpreter's own start beside surgery's --help and inspect of BIG."""
    py, p = sys.executable, str(big)
    rows = [
        ("python -c pass", "floor", [py, "-c", "pass"]),
        ("python -S -c pass", "floor-no-site", [py, "-S", "-c", "pass"]),
        ("surgery --help", "help", [py, "-m", "surgery", "--help"]),
        ("surgery inspect --json BIG", "inspect", [py, "-m", "surgery", "inspect", p, "--json"]),
        ("surgery inspect BIG", "inspect", [py, "-m", "surgery", "inspect", p]),
    ]
    return [harness.row(c, k, a, format="torch-zip") for c, k, a in rows]


def startup(paths: dict[str, Path], folder: Path, env: dict[str, str], runs: int) -> dict:
    """Run the start-up rows interleaved; their medians, ratios to `python -c pass`, aims, load."""
    rows = startup_commands(paths["torch-zip"])
    load_before = os.getloadavg()
    busy0, own0 = harness.busy_cpu_seconds(), harness.own_cpu_seconds()
    harness.run_all(rows, folder, env, runs=runs)
    busy1, own1 = harness.busy_cpu_seconds(), harness.own_cpu_seconds()
    load = {
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "commands_cpu_s": round(own1 - own0, 2),
    }
    if busy0 is not None and busy1 is not None:
        load["other_cpu_s"] = round(max(busy1 - busy0 - (own1 - own0), 0.0), 2)
    problems = harness.summarize(rows)
    floor = rows[0]["median_s"]
    for r in rows:
        r["ratio"] = r["median_s"] / floor
        aim = STARTUP_AIMS.get(r["kind"])
        r["aim"] = aim
        r["aim_met"] = None if aim is None else (not r.get("failed") and r["ratio"] <= aim)
    return {"rows": rows, "load": load, "runs": runs, "problems": problems}


def startup_table(rows: list[dict]) -> str:
    head = ["command", "median wall ms", "x `python -c pass`", "aim", "peak RSS MiB"]
    body = []
    for r in rows:
        aim = "" if r["aim"] is None else f"<= {r['aim']:.0f}x: {'met' if r['aim_met'] else 'MISSED'}"
        wall = f"FAILED ({r['failed']})" if r.get("failed") else f"{1000 * r['median_s']:.1f}"
        body.append(
            [f"`{r['command']}`", wall, f"{r['ratio']:.2f}", aim, f"{harness.mib(r['max_rss_kib']):.1f}"]
        )
    return harness.markdown_table(head, "lrrlr", body)


def check_surgery_json(path: Path, fmt: str, facts: dict) -> str | None:
    """Run surgery once with its output kept; None when it lists the right tensors, else the problem."""
    proc = subprocess.run(
        [sys.executable, "-m", "surgery", "inspect", str(path), "--json"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"
    data = json.loads(proc.stdout)
    tensors = data.get("tensors", [])
    if len(tensors) != facts["num_tensors"]:
        return f"lists {len(tensors)} tensors, expected {facts['num_tensors']}"
    total = sum(t["bytes"] for t in tensors)
    if total != facts["tensor_bytes"]:
        return f"tensor bytes {total}, expected {facts['tensor_bytes']}"
    if data.get("format") != fmt:
        return f"format {data.get('format')!r}, expected {fmt!r}"
    return None


def speedup(r: dict) -> str:
    return "-" if r.get("speedup") is None else f"{r['speedup']:.1f}x"


def table(rows: list[dict]) -> str:
    head = ["format", "command", "median wall s", "peak RSS MiB", "speed-up vs plain"]
    body = ([r["format"], f"`{r['command']}`", *harness.timing_cells(r), speedup(r)] for r in rows)
    return harness.markdown_table(head, "llrrr", body)


def main() -> int:
    parser = harness.benchmark_parser(__doc__, "generate")
    parser.add_argument("--size-gb", type=float, default=1.2, help="checkpoint size in GB (10^9 bytes)")
    parser.add_argument("--tensors", type=int, default=400, help="number of tensors")
    parser.add_argument(
        "--startup-runs", type=int, default=STARTUP_RUNS, help="timed runs of each start-up command"
    )
    args = parser.parse_args()

    if args._generate:
        return harness.reply(generate(Path(args._generate), args.size_gb, args.tensors))

    with tempfile.TemporaryDirectory(prefix="bench_inspect_", ignore_cleanup_errors=True) as tmp:
        folder = Path(tmp)
        print(f"making {args.size_gb} GB x 3 formats, {args.tensors} tensors, in {folder} ...", flush=True)
        gen = ["--_generate", str(folder), "--size-gb", str(args.size_gb), "--tensors", str(args.tensors)]
        facts = harness.child(__file__, gen)
        print(
            f"  {facts['num_tensors']} tensors, {facts['tensor_bytes'] / 1e9:.3f} GB of float32 "
            f"(made in {facts['seconds_make']} s, saved in {facts['seconds_save']} s); "
            + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in facts["file_bytes"].items()),
            flush=True,
        )
        paths = {fmt: folder / name for fmt, name in FORMATS.items()}

        problems = []
        for fmt, path in paths.items():
            bad = check_surgery_json(path, fmt, facts)
            print(
                f"  surgery --json on {fmt}: {bad or 'ok, lists every tensor with the right sizes'}",
                flush=True,
            )
            if bad:
                problems.append(f"surgery on {fmt}: {bad}")

        env, bytecode = harness.child_env(folder, args.env_as_is)
        print(f"  bytecode cache for the commands: {bytecode}", flush=True)
        rows = commands(paths)
        code = harness.code_state()
        clear_refs_ok = harness.run_all(rows, folder, env)
        problems += harness.summarize(rows)
        print(f"  start-up: {len(startup_commands(paths['torch-zip']))} commands interleaved ...", flush=True)
        start = startup(paths, folder, env, args.startup_runs)
        problems += start["problems"]
        if harness.code_state() != code:
            problems.append("surgery's code changed during the run")
        surgery = {r["format"]: r for r in rows if r["kind"] == "surgery"}
        for r in rows:
            s = surgery.get(r["format"])
            if s and r["kind"].startswith("plain") and not s.get("failed") and not r.get("failed"):
                r["speedup"] = r["median_s"] / s["median_s"]

        targets = []
        for fmt, s in surgery.items():
            plain = next(r for r in rows if r["format"] == fmt and r["kind"] == "plain")
            speed = plain.get("speedup")
            rss_bytes = s["max_rss_kib"] * 1024
            targets.append(
                {
                    "format": fmt,
                    "against": plain["command"],
                    "speedup": speed,
                    "speed_ok": speed is not None and speed > SPEED_TARGET,
                    "peak_rss_mib": harness.mib(s["max_rss_kib"]),
                    "rss_ok": not s.get("failed") and rss_bytes < RSS_TARGET_BYTES,
                }
            )

        print()
        print(
            f"{facts['num_tensors']} float32 tensors, {facts['tensor_bytes'] / 1e9:.2f} GB; "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {facts['torch_version']}, "
            f"safetensors {facts['safetensors_version']}. Median of {harness.RUNS} runs after 1 warm-up, all warm "
            "(files in page cache, nothing dropped)."
        )
        print(f"Bytecode cache: {bytecode}.")
        print()
        print(table(rows))
        print()
        print("- speed-up vs plain = plain median wall time / surgery median wall time, same format.")
        print("- torch-legacy: torch cannot mmap the legacy format, so the plain load reads all tensor data.")
        harness.print_floor_note(rows)
        harness.print_clear_refs_warning(clear_refs_ok)
        for t in targets:
            speed = "n/a" if t["speedup"] is None else f"{t['speedup']:.1f}x"
            print(
                f"- target {t['format']}: {speed} vs {t['against']} (> {SPEED_TARGET:.0f}x: "
                f"{'met' if t['speed_ok'] else 'MISSED'}); peak RSS {t['peak_rss_mib']:.1f} MiB "
                f"(< 60 MB = 57.2 MiB: {'met' if t['rss_ok'] else 'MISSED'})"
            )
        load = start["load"]
        print()
        print(
            f"Start-up: median of {start['runs']} runs of each command, interleaved, after 1 warm-up; "
            f"BIG = the torch zip above ({facts['num_tensors']} tensors). Load average "
            f"{'/'.join(f'{x:.2f}' for x in load['loadavg_before'])} before, "
            f"{'/'.join(f'{x:.2f}' for x in load['loadavg_after'])} after"
            + (
                f"; other processes used {load['other_cpu_s']} CPU-s meanwhile."
                if "other_cpu_s" in load
                else "."
            )
        )
        print()
        print(startup_table(start["rows"]))

        return harness.finish(
            RESULTS,
            {
                "benchmark": "inspect",
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": {
                    "nproc": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                    "torch": facts["torch_version"],
                    "safetensors": facts["safetensors_version"],
                },
                "params": {
                    "size_gb": args.size_gb,
                    "tensors": args.tensors,
                    **harness.measuring_params(args.env_as_is, bytecode),
                },
                "checkpoint": facts,
                **harness.measuring_method(clear_refs_ok, synced=False),
                "rows": [harness.record(r, folder, speedup_vs_plain=r.get("speedup")) for r in rows],
                "targets": {
                    "speedup_over": SPEED_TARGET,
                    "peak_rss_under_bytes": RSS_TARGET_BYTES,
                    "results": targets,
                },
                "startup": {
                    "runs": start["runs"],
                    "aims": STARTUP_AIMS,
                    "load": load,
                    "rows": [
                        {
                            "command": r["command"],
                            "kind": r["kind"],
                            "argv": [harness.shown(a, folder) for a in r["argv"]],
                            "median_wall_s": r["median_s"],
                            "ratio_to_python_c_pass": r["ratio"],
                            "aim": r["aim"],
                            "aim_met": r["aim_met"],
                            "peak_rss_kib": r["max_rss_kib"],
                            "failed": r.get("failed"),
                            "runs": r["runs"],
                            "warmup": r["warmup"],
                        }
                        for r in start["rows"]
                    ],
                    "table_markdown": startup_table(start["rows"]),
                },
                "code": code,
                "problems": problems,
                "table_markdown": table(rows),
            },
        )


if __name__ == "__main__":
    sys.exit(main())
