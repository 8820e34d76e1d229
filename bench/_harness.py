"""Measurement machinery shared by the bench/*.py scripts.

* ``_shapes`` / ``layout``: the tensor layout of the synthetic checkpoints (conv stem, conv
  stages, transformer blocks; width chosen to come closest to a byte target).
* ``run_all``: every row's command, one warm-up then ``RUNS`` timed runs round-robin, each in
  its own child process spawned by a lean ``python -S -I`` runner (``RUNNER``) with fork; the
  child's peak RSS is reset (``/proc/self/clear_refs`` ``5``) before ``exec`` and read back with
  ``os.wait4`` (``ru_maxrss``). Rows may name ``outputs`` (files or folders), deleted before every
  run outside the timing, then ``os.sync()`` when asked.
* ``child_env``: the commands' environment and bytecode-cache handling.
* ``summarize``: median wall time, max peak RSS and failures of each row.
* ``busy_cpu_seconds`` / ``own_cpu_seconds`` / ``code_state`` / ``machine``: what else ran, which
  code was measured, on what machine; ``Watch`` holds them around a span of measuring.
* ``benchmark_parser`` / ``child`` / ``reply`` / ``check_in_child``: the scripts' arguments and
  their child modes (making inputs, checking outputs) in a child process of the same script.
* ``row`` / ``measurement_floor``: the measured commands; ``against_plain(s)``: surgery's
  ratios to the plain ways, judged against an aim.
* ``markdown_table`` / ``ratio_table`` / ``print_*``: the printout; ``results_head`` /
  ``measuring_params`` / ``measuring_method`` / ``record`` / ``ratio_fields`` / ``finish``: the
  JSON document and the exit code.

This module never imports torch: the benchmark process's own RSS would otherwise leak into
the children's ``ru_maxrss`` (see bench_inspect.py's docstring).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUNS = 3
OTHER_CPU_LIMIT = 0.05  # CPU-seconds used by other processes per second of a watched span, before a PROBLEM
PEAK_RSS_METHOD = (
    "os.wait4 ru_maxrss of each child, spawned by a lean `python -S -I` runner with fork "
    "and /proc/self/clear_refs 5 before exec"
)
BETWEEN_RUNS = "the command's output deleted, then sync(), outside the timing"


def mib(kib: int) -> float:
    return kib / 1024


# --------------------------------------------------------------------------- layout


def _shapes(width: int):
    """Endless (name, shape) stream: a conv stem, then conv stages and transformer blocks."""
    w = width
    c0 = max(w // 4, 1)
    yield "stem.conv.weight", (c0, 3, 7, 7)
    for p in ("weight", "bias", "running_mean", "running_var"):
        yield f"stem.bn.{p}", (c0,)
    i = 0
    while True:
        if i % 3 == 0:  # residual conv block, channels cycle w/4, w/2, w
            c = max(w >> (2 - (i // 3) % 3), 1)
            for j in (1, 2):
                yield f"blocks.{i}.conv{j}.weight", (c, c, 3, 3)
                for p in ("weight", "bias", "running_mean", "running_var"):
                    yield f"blocks.{i}.bn{j}.{p}", (c,)
        else:  # transformer block, width w
            pre = f"blocks.{i}"
            yield f"{pre}.ln1.weight", (w,)
            yield f"{pre}.ln1.bias", (w,)
            yield f"{pre}.attn.qkv.weight", (3 * w, w)
            yield f"{pre}.attn.qkv.bias", (3 * w,)
            yield f"{pre}.attn.proj.weight", (w, w)
            yield f"{pre}.attn.proj.bias", (w,)
            yield f"{pre}.ln2.weight", (w,)
            yield f"{pre}.ln2.bias", (w,)
            yield f"{pre}.mlp.fc1.weight", (4 * w, w)
            yield f"{pre}.mlp.fc1.bias", (4 * w,)
            yield f"{pre}.mlp.fc2.weight", (w, 4 * w)
            yield f"{pre}.mlp.fc2.bias", (w,)
        i += 1


def layout(n_tensors: int, target_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """The first n tensors of `_shapes(width)`, width (a multiple of 8) chosen to come closest to target."""

    def take(width: int):
        stream = _shapes(width)
        return [next(stream) for _ in range(n_tensors)]

    def nbytes(layout) -> int:
        total = 0
        for _, shape in layout:
            n = 4
            for d in shape:
                n *= d
            total += n
        return total

    lo, hi = 1, 1 << 14  # width = 8 * k
    while lo < hi:  # smallest k with size >= target
        mid = (lo + hi) // 2
        if nbytes(take(8 * mid)) >= target_bytes:
            hi = mid
        else:
            lo = mid + 1
    candidates = [take(8 * k) for k in (max(lo - 1, 1), lo)]
    return min(candidates, key=lambda lay: abs(nbytes(lay) - target_bytes))


# --------------------------------------------------------------------------- measuring
# The measuring loop runs in a lean child interpreter (`python -S -I`, no torch, few
# modules): each command's ru_maxrss can hold no more than this runner's own RSS, the
# measurement floor (about 8 MiB), reported as the `true` row.

RUNNER = r"""
import json, os, shutil, subprocess, sys, time

def reset_peak_rss():  # in the forked child, before exec: peak RSS := current RSS
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

def measure(argv, env):
    t0 = time.perf_counter()
    # preexec_fn makes Popen fork rather than vfork: with vfork the child would inherit
    # the runner's peak RSS as its own ru_maxrss.
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env, preexec_fn=reset_peak_rss
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
    return {"wall_s": wall, "rss_kib": usage.ru_maxrss, "exit": proc.returncode}

def prepare(outputs, sync):  # outside the timing
    for p in outputs:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    if sync:
        os.sync()

with open(sys.argv[1]) as f:
    job = json.load(f)
rows = job["rows"]
print(f"warm-up: one run of each of {len(rows)} commands ...", file=sys.stderr, flush=True)
results = []
for row in rows:
    prepare(row["outputs"], job["sync"])
    results.append({"warmup": measure(row["argv"], job["env"]), "runs": []})
for i in range(job["runs"]):  # round-robin, so drift hits every command alike
    print(f"run {i + 1}/{job['runs']} ...", file=sys.stderr, flush=True)
    for row, res in zip(rows, results):
        prepare(row["outputs"], job["sync"])
        res["runs"].append(measure(row["argv"], job["env"]))
json.dump({"clear_refs_writable": os.access("/proc/self/clear_refs", os.W_OK), "results": results}, sys.stdout)
"""


def run_all(
    rows: list[dict], folder: Path, env: dict[str, str], *, sync: bool = False, runs: int = RUNS
) -> bool:
    """Warm-up plus `runs` timed runs of every row's argv, in the lean runner; fills rows in place.

    A row's optional "outputs" (files or folders) are deleted before each of its runs, outside
    the timing; with `sync`, os.sync() follows, so no run pays for an earlier run's writeback.
    Returns whether /proc/self/clear_refs was writable (else RSS includes the runner's).
    """
    job = folder / "job.json"
    job.write_text(
        json.dumps(
            {
                "rows": [{"argv": r["argv"], "outputs": r.get("outputs", [])} for r in rows],
                "runs": runs,
                "env": env,
                "sync": sync,
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-I", "-c", RUNNER, str(job)], stdout=subprocess.PIPE, text=True, check=True
    )
    out = json.loads(proc.stdout)
    for r, res in zip(rows, out["results"], strict=True):
        r.update(res)
    return out["clear_refs_writable"]


def summarize(rows: list[dict], *, count_warmup: bool = False) -> list[str]:
    """Set each row's median_s and max_rss_kib (and `failed`); return the failures' descriptions."""
    problems = []
    for r in rows:
        runs = r["runs"] + ([r["warmup"]] if count_warmup else [])
        codes = sorted({run["exit"] for run in runs} - {0})
        if codes:
            r["failed"] = f"exit {codes[0]}"
            problems.append(f"{r.get('case', r.get('format'))} {r['command']}: exit {codes}")
        r["median_s"] = statistics.median(run["wall_s"] for run in r["runs"])
        r["max_rss_kib"] = max(run["rss_kib"] for run in r["runs"])
    return problems


def child_env(folder: Path, as_is: bool, *, this_checkout: bool = False) -> tuple[dict[str, str], str]:
    """The environment of the measured commands, and how it treats bytecode caching.

    With PYTHONDONTWRITEBYTECODE set (as in some containers), a package installed editable
    from a source tree without __pycache__ (surgery here) is compiled from source at every
    run, while torch & co. were compiled when pip installed them. By default the commands
    get a fresh PYTHONPYCACHEPREFIX in the temporary folder instead, filled by the warm-up
    runs, so every command runs from cached bytecode as after a normal install; the
    source tree is not written to. With `this_checkout`, PYTHONPATH starts with the
    checkout the script belongs to, so that `python -m surgery` runs its code from any folder.
    """
    env = dict(os.environ)
    if this_checkout:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if as_is:
        if env.get("PYTHONPYCACHEPREFIX"):
            mode = f"as is (PYTHONPYCACHEPREFIX={env['PYTHONPYCACHEPREFIX']})"
        elif env.get("PYTHONDONTWRITEBYTECODE"):
            mode = "as is (PYTHONDONTWRITEBYTECODE set: only modules with existing __pycache__ are cached)"
        else:
            mode = "as is (__pycache__ next to the sources)"
        return env, mode
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(folder / "pycache")
    return env, "fresh PYTHONPYCACHEPREFIX in the temporary folder, filled by the warm-up runs"


# --------------------------------------------------------------------------- rows and aims


def row(command: str, kind: str, argv: list, out: Path | None = None, note: str = "", **fields: Any) -> dict:
    """One command to measure: its label in the table, its kind (what aims and checks look it up by),
    its argv, the output deleted before each of its runs, a note; `fields` (case, format, ...) place it."""
    return {
        **fields,
        "command": command,
        "kind": kind,
        "argv": [str(a) for a in argv],
        "outputs": [str(out)] if out else [],
        "note": note,
    }


def measurement_floor(**fields: Any) -> list[dict]:
    """The `true` row: what every command's peak RSS holds of the runner itself (no row reads below it)."""
    true = shutil.which("true")
    if not true:
        return []
    return [
        row("true [measurement floor]", "launcher", [true], note="RSS inherited from the runner", **fields)
    ]


def against_plain(surgery: dict, plain: dict, time_at_most: float, memory_at_most: float) -> dict:
    """surgery's median wall time and peak RSS over a plain row's, judged against the aim.

    The ratios are also set on the plain row (the surgery/this columns of `ratio_table`). Empty
    when either row failed.
    """
    if surgery.get("failed") or plain.get("failed"):
        return {}
    time_ratio = surgery["median_s"] / plain["median_s"]
    memory_ratio = surgery["max_rss_kib"] / plain["max_rss_kib"]
    plain.update(time_ratio=time_ratio, memory_ratio=memory_ratio)
    return {
        "time_ratio": time_ratio,
        "time_ok": time_ratio <= time_at_most,
        "memory_ratio": memory_ratio,
        "memory_ok": memory_ratio <= memory_at_most,
    }


def against_plains(
    by_kind: dict[str, dict], plain_kinds: tuple[str, ...], time_at_most: float, memory_at_most: float
) -> dict:
    """`against_plain` for each of the plain rows named; the first is judged, the others shown."""
    aims = {}
    for kind in plain_kinds:
        aim = against_plain(by_kind["surgery"], by_kind[kind], time_at_most, memory_at_most)
        if aim:
            aims[kind] = aim | {"judged": kind == plain_kinds[0]}
    return aims


# --------------------------------------------------------------------------- child processes
# The benchmark process never imports torch nor holds tensors (its RSS would leak into the
# measured children's ru_maxrss): the inputs are made and the outputs checked by the same
# script run again in a hidden child mode (`--_generate DIR`, `--_check JOB`, ...).


def benchmark_parser(doc: str, *child_modes: str) -> argparse.ArgumentParser:
    """The script's arguments: described by its docstring's first paragraph, with --env-as-is
    (see `child_env`) and a hidden `--_MODE PATH` for each of its child modes."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--env-as-is",
        action="store_true",
        help="run the commands in this environment exactly (by default they get a bytecode cache)",
    )
    for mode in child_modes:
        parser.add_argument(f"--_{mode}", metavar="PATH", help=argparse.SUPPRESS)
    return parser


def child(script: str, args: list[str], env: dict[str, str] | None = None) -> Any:
    """Run `script` in a child mode (`args`, starting with the mode's flag); the JSON it `reply`s."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {args[0]} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reply(answer: Any) -> int:
    """A child mode's answer: one JSON line on stdout, the last line `child` reads; exit code 0."""
    print(json.dumps(answer))
    return 0


def check_in_child(script: str, folder: Path, job: dict) -> Any:
    """The checker: `job` (the paths to compare) written to check.json, `script --_check` run on it."""
    path = folder / "check.json"
    path.write_text(json.dumps(job))
    return child(script, ["--_check", str(path)])


# --------------------------------------------------------------------------- context


def busy_cpu_seconds() -> float | None:
    """CPU time the whole machine has spent busy since boot (/proc/stat), in seconds."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this process and every waited-for child (the runner and its commands)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def code_state() -> dict:
    """The commit measured, and surgery's files changed since (uncommitted work is measured as it stands)."""
    repo = HERE.parent

    def git(*argv: str) -> str | None:
        proc = subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    changed = (git("diff", "--name-only", "HEAD", "--", "surgery") or "").split()
    changed += (git("ls-files", "--others", "--exclude-standard", "--", "surgery") or "").split()
    diff = subprocess.run(["git", "-C", str(repo), "diff", "HEAD", "--", "surgery"], capture_output=True)
    return {
        "commit": git("rev-parse", "HEAD"),
        "surgery_changed_files": changed,
        "surgery_diff_sha256": hashlib.sha256(diff.stdout).hexdigest() if diff.returncode == 0 else None,
    }


def machine(folder: Path, facts: dict) -> dict:
    mem_kib = None
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        pass
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    fs = None
    df = subprocess.run(["df", "-T", str(folder)], capture_output=True, text=True)
    if df.returncode == 0 and len(df.stdout.splitlines()) > 1:
        fs = df.stdout.splitlines()[1].split()[1]
    st = subprocess.run(["stat", "-f", "-c", "%T", str(folder)], capture_output=True, text=True)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
        "tmp_filesystem": fs,
        "tmp_filesystem_stat": st.stdout.strip() if st.returncode == 0 else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": facts["torch_version"],
        "torchvision": facts.get("torchvision_version"),
        "safetensors": facts["safetensors_version"],
    }


def _loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


class Watch:
    """The machine and the code around a span of measuring: started when made, ended by `stop`.

    The machine is shared: CPU time other processes use meanwhile (its busy time from /proc/stat
    minus this process's and its children's) disturbs the times, and surgery's files changing
    mid-span mean the rows measured different code. `problems` names either.
    """

    def __init__(self, span: str = "the timed runs") -> None:
        self.span = span
        self.code_before = code_state()
        self._loadavg_before = _loadavg()
        self._busy, self._own, self._wall = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()

    def stop(self) -> None:
        """End the span: `load` (the JSON's cpu_during_runs) and `code_after` are set."""
        busy, own, wall = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        self.load: dict = {
            "wall_s": round(wall - self._wall, 1),
            "benchmark_cpu_s": round(own - self._own, 1),
            "loadavg_before": self._loadavg_before,
            "loadavg_after": _loadavg(),
        }
        if busy is not None and self._busy is not None:
            self.load["machine_busy_cpu_s"] = round(busy - self._busy, 1)
            self.load["other_cpu_s"] = round(max(busy - self._busy - (own - self._own), 0.0), 1)
        self.code_after = code_state()

    def lines(self) -> list[str]:
        """Which code was measured, the load average, and who used the CPU meanwhile."""
        changed = self.code_before["surgery_changed_files"]
        lines = [
            f"surgery at commit {(self.code_before['commit'] or '?')[:10]}"
            + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")
            + ".",
            f"Load average (1, 5, 15 min) before {' '.join(self.load['loadavg_before'])}, "
            f"after {' '.join(self.load['loadavg_after'])}.",
        ]
        if "other_cpu_s" in self.load:
            lines.append(
                f"CPU during {self.span}: {self.load['benchmark_cpu_s']} s by the benchmark's commands, "
                f"{self.load['other_cpu_s']} s by anything else, in {self.load['wall_s']} s of wall time."
            )
        return lines

    def problems(self) -> list[str]:
        other, wall = self.load.get("other_cpu_s"), self.load["wall_s"]
        problems = []
        if other is not None and other > OTHER_CPU_LIMIT * wall:
            problems.append(
                f"other processes used {other} CPU-seconds during the {wall} s of {self.span}: "
                "the times are disturbed, rerun on a quiet machine"
            )
        if self.code_after != self.code_before:
            problems.append("surgery's code changed while the benchmark ran: rerun it")
        return problems


# --------------------------------------------------------------------------- printout


def cell(x: float | None, spec: str) -> str:
    """A number in a table cell; "-" where there is none (a failed row, a ratio that does not apply)."""
    return "-" if x is None else format(x, spec)


def timing_cells(r: dict) -> list[str]:
    """A row's median wall s and peak RSS MiB cells; FAILED and "-" when it failed."""
    if r.get("failed"):
        return [f"FAILED ({r['failed']})", "-"]
    return [f"{r['median_s']:.3f}", f"{mib(r['max_rss_kib']):.1f}"]


def markdown_table(head: list[str], align: str, body: Iterable[list[str]]) -> str:
    """A Markdown table; `align` has a letter per column: l (text) or r (numbers)."""
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def ratio_table(rows: list[dict]) -> str:
    """The table of a benchmark of one surgery command beside plain ways: `against_plain`'s ratios
    on each plain row."""
    head = ["command", "median wall s", "peak RSS MiB", "surgery/this: time", "surgery/this: memory"]
    body = (
        [
            f"`{r['command']}`",
            *timing_cells(r),
            cell(r.get("time_ratio"), ".2f"),
            cell(r.get("memory_ratio"), ".2f"),
        ]
        for r in rows
    )
    return markdown_table(head, "lrrrr", body)


def print_ratio_note(judged_against: str = "") -> None:
    """What the surgery/this columns of `ratio_table` mean."""
    print(
        "- ratios, on each plain row: surgery's median wall time / this row's, surgery's peak RSS / this "
        "row's (below 1: surgery faster, smaller)"
        + (f"; the aim is judged against {judged_against}." if judged_against else ".")
    )


def print_context(
    mach: dict,
    bytecode: str,
    watch: Watch,
    *,
    also: dict[str, str | None] | None = None,
    warm: str = "inputs",
) -> None:
    """The lines above the table: the machine, the versions (torch, safetensors and `also`), how the
    commands ran, the bytecode cache, the code measured and what else ran meanwhile."""
    versions = {"torch": mach["torch"], "safetensors": mach["safetensors"], **(also or {})}
    print()
    print(
        f"{mach['nproc']} CPUs ({mach['cpu']}), {mach['mem_gib']} GiB, {mach['tmp_filesystem']} temp folder; "
        f"Python {mach['python']}, {', '.join(f'{k} {v}' for k, v in versions.items())}. Median of {RUNS} runs "
        f"after 1 warm-up; {warm} warm in the page cache; outputs deleted and sync() before every run."
    )
    print(f"Bytecode cache: {bytecode}.")
    for line in watch.lines():
        print(line)


def print_floor_note(rows: list[dict]) -> None:
    """What peak RSS is, and the measurement floor (the `true` row), when there is one."""
    floor = next((r for r in rows if r["kind"] == "launcher"), None)
    if floor:
        print(
            f"- peak RSS is the child's own ru_maxrss (os.wait4), file-backed pages included; measurement "
            f"floor {mib(floor['max_rss_kib']):.1f} MiB (`true` launched the same way)."
        )


def print_clear_refs_warning(clear_refs_ok: bool) -> None:
    if not clear_refs_ok:
        print("- WARNING: /proc/self/clear_refs not writable: RSS rows include the runner's peak RSS.")


def print_spread(rows: list[dict]) -> None:
    """Each row's fastest and slowest timed run: how far its median can be trusted."""
    print("- spread of the timed runs (fastest - slowest wall s):")
    for r in rows:
        walls = sorted(run["wall_s"] for run in r["runs"])
        where = f"{r['case']} " if "case" in r else ""
        print(f"  - {where}`{r['command']}`: {walls[0]:.3f} - {walls[-1]:.3f}")


def print_aims(aims: dict[str, dict], time_at_most: float, memory_at_most: float) -> None:
    """`against_plain`'s verdicts, one line per plain row (a row not `judged` is shown only)."""
    for against, a in aims.items():
        verdict = (
            f"time {'met' if a['time_ok'] else 'MISSED'} (<= {time_at_most:.2f}), "
            f"memory {'met' if a['memory_ok'] else 'MISSED'} (<= {memory_at_most:.2f})"
            if a.get("judged", True)
            else "shown, not judged"
        )
        print(
            f"- aim vs {against}: time ratio {a['time_ratio']:.3f}, memory ratio {a['memory_ratio']:.3f}: "
            f"{verdict}"
        )


# --------------------------------------------------------------------------- the results document


def results_head(benchmark: str, mach: dict, watch: Watch) -> dict:
    """The fields every results document starts with: which benchmark, when, on what machine,
    which code, what else ran."""
    return {
        "benchmark": benchmark,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": mach,
        "code": {"before": watch.code_before, "after": watch.code_after},
        "cpu_during_runs": watch.load,
    }


def measuring_params(env_as_is: bool, bytecode: str) -> dict:
    """The params every benchmark shares: timed runs, warm-ups, the commands' environment."""
    return {"runs": RUNS, "warmup_runs": 1, "env_as_is": env_as_is, "bytecode_cache": bytecode}


def measuring_method(clear_refs_ok: bool, *, synced: bool = True) -> dict:
    """How each run was measured (see `run_all`); `synced`: outputs deleted and sync() before each."""
    return {
        "warm_cache": True,
        **({"between_runs": BETWEEN_RUNS} if synced else {}),
        "peak_rss_method": PEAK_RSS_METHOD,
        "clear_refs_writable": clear_refs_ok,
    }


def shown(arg: str, folder: Path) -> str:
    """An argument as the JSON records it: a path in the temporary folder relative to it (elsewhere
    the folder as DIR), an inline script by its first line."""
    if arg.startswith(str(folder)):
        return str(Path(arg).relative_to(folder))
    arg = arg.replace(str(folder), "DIR")
    return (
        arg if "\n" not in arg else f"{arg.splitlines()[0]} ... (the script is in {Path(sys.argv[0]).name})"
    )


def record(r: dict, folder: Path, **derived: Any) -> dict:
    """A measured row as the JSON holds it: where it belongs, what ran, its median and peak, what
    the script derived from them (ratios), every run."""
    return {
        **{k: r[k] for k in ("case", "format", "command", "kind") if k in r},
        "argv": [shown(a, folder) for a in r["argv"]],
        "note": r["note"],
        "median_wall_s": r["median_s"],
        "peak_rss_kib": r["max_rss_kib"],
        "peak_rss_mib": round(mib(r["max_rss_kib"]), 2),
        **derived,
        "failed": r.get("failed"),
        "runs": r["runs"],
        "warmup": r["warmup"],
    }


def ratio_fields(
    rows: list[dict], folder: Path, aims: dict, time_at_most: float, memory_at_most: float
) -> dict:
    """The rows and the aim of a `ratio_table` benchmark as the JSON holds them."""
    return {
        "rows": [
            record(
                r, folder, surgery_time_ratio=r.get("time_ratio"), surgery_memory_ratio=r.get("memory_ratio")
            )
            for r in rows
        ],
        "aim": {"time_ratio_at_most": time_at_most, "memory_ratio_at_most": memory_at_most, "results": aims},
    }


def finish(path: Path, doc: dict) -> int:
    """The run's last words: a PROBLEM line per problem, the JSON document under bench/results/;
    the exit code, 1 when there were problems."""
    for p in doc["problems"]:
        print(f"- PROBLEM: {p}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(path.parents[2])}")
    return 1 if doc["problems"] else 0
