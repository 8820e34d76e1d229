"""Measurement machinery shared by the bench/*.py scripts.

* ``_shapes`` / ``_layout``: the tensor layout of the synthetic checkpoints (conv stem, conv
  stages, transformer blocks; width chosen to come closest to a byte target).
* ``run_all``: every row's command, one warm-up then ``RUNS`` timed runs round-robin, each in
  its own child process spawned by a lean ``python -S -I`` runner (``RUNNER``) with fork; the
  child's peak RSS is reset (``/proc/self/clear_refs`` ``5``) before ``exec`` and read back with
  ``os.wait4`` (``ru_maxrss``). Rows may name ``outputs`` (files or folders), deleted before every
  run outside the timing, then ``os.sync()`` when asked.
* ``child_env``: the commands' environment and bytecode-cache handling.
* ``summarize``: median wall time, max peak RSS and failures of each row.
* ``busy_cpu_seconds`` / ``own_cpu_seconds`` / ``code_state`` / ``machine``: what else ran, which
  code was measured, on what machine.

This module never imports torch: the benchmark process's own RSS would otherwise leak into
the children's ``ru_maxrss`` (see bench_inspect.py's docstring).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = 3


def _mib(kib: int) -> float:
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


def _layout(n_tensors: int, target_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
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


def child_env(folder: Path, as_is: bool) -> tuple[dict[str, str], str]:
    """The environment of the measured commands, and how it treats bytecode caching.

    With PYTHONDONTWRITEBYTECODE set (as in some containers), a package installed editable
    from a source tree without __pycache__ (surgery here) is compiled from source at every
    run, while torch & co. were compiled when pip installed them. By default the commands
    get a fresh PYTHONPYCACHEPREFIX in the temporary folder instead, filled by the warm-up
    runs, so every command runs from cached bytecode as after a normal install; the
    source tree is not written to.
    """
    env = dict(os.environ)
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


def write_results(path: Path, doc: dict) -> int:
    """The run's JSON document under bench/results/; the exit code: 1 when it reported problems."""
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(path.parents[2])}")
    return 1 if doc["problems"] else 0
