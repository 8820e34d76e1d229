"""Benchmark `surgery convert` and `surgery diff` against the physical limit and the plain torch way.

What it measures
    Wall time and peak RSS of separate child processes, at several checkpoint
    sizes (``--sizes-gb``, default 1.2,2). Each size is a state_dict of float32
    tensors (``torch.manual_seed(0)``), about ``--tensors-per-gb`` (300) per GB:
    the layout of bench_inspect.py (conv and transformer blocks, biases, norms)
    for 85% of the bytes plus two big ones (``embed.weight``, ``head.weight``),
    every key prefixed ``module.`` (as DataParallel saves it). It is saved as
    ``src.pth`` (``torch.save``, zip) and ``src.safetensors`` (``save_file``, the
    same keys and values), in a temporary folder on the filesystem of /tmp.

    Cases, per size (the physical limit is ``cp --reflink=never``: the same bytes,
    read and written by the kernel, nothing parsed; and since surgery fsyncs what
    it writes, the fair reference is ``cp --reflink=never SRC DST && sync DST``,
    "cp&&sync"):

    1. zip -> safetensors, renaming: ``surgery convert src.pth -o OUT.safetensors
       --strip-prefix module.`` (and once more with ``--verify``, shown, not
       judged) vs ``cp --reflink=never src.pth OUT`` vs the plain way::

           sd = torch.load(p, weights_only=True, mmap=True)   # and mmap=False
           sd = {k.removeprefix("module."): v for k, v in sd.items()}
           safetensors.torch.save_file(sd, out)

       Reference rows: ``cp`` as is (coreutils picks copy_file_range / reflink)
       and ``cp --reflink=never`` followed by ``sync OUT`` (an fsync: surgery
       fsyncs its output, cp and the plain ways do not).
    2. safetensors -> sharded safetensors: ``surgery convert src.safetensors -o
       DIR --shard-size 500MB`` vs ``cp --reflink=never`` vs ``load_file`` +
       huggingface_hub's ``split_torch_state_dict_into_shards`` (or an
       equivalent split, if huggingface_hub is missing) + ``save_file`` per
       shard + the index json.
    3. zip -> safetensors in bf16: ``surgery convert src.pth -o OUT.safetensors
       --dtype bf16`` vs ``torch.load(mmap=True)``, ``.to(torch.bfloat16)`` on
       floating tensors, ``save_file``.
    4. the same in fp16 (``--dtype fp16 --allow-lossy-cast``: the random values
       include some fp16 flushes to zero, which surgery refuses unless allowed;
       ``.to(torch.float16)``).
    5. ``surgery diff src.pth src.safetensors`` (identical values) vs loading both
       (``torch.load(mmap=True)``, ``load_file``) and, per key, ``torch.equal``
       and, where not equal, ``(a - b).abs().max()``.
    6. ``surgery diff --structure-only`` (headers only), for reference.

    plus ``python -c "import torch"`` (import floor) and ``true`` (measurement
    floor), measured with the first size.

    Measured with the shared machinery (_harness.py, as bench_inspect.py and
    bench_port.py): each command in its own child process forked by a lean
    ``python -S -I`` runner, peak RSS reset before ``exec`` and read with
    ``os.wait4``; one warm-up, then 3 timed runs round-robin; median wall time,
    max peak RSS. Before every run, outside the timing, the command's output
    (file or folder) is deleted and ``sync()`` is called, so every run writes a
    fresh output and none pays for an earlier run's writeback. The page cache
    is not dropped: the sources are warm for every run.

    Throughput is the source file's bytes / median wall time (MB/s, 10^6): for
    every row, the bytes of the file the case starts from (``src.pth`` for cases
    1, 3, 4, 5; ``src.safetensors`` for case 2; diff reads both files, twice
    that). "vs cp" is that throughput / the ``cp --reflink=never`` row's, same
    size and source; "vs cp&&sync" the same against the cp&&sync row's. "speed-up vs plain" is the fastest plain row's median /
    this row's median, same case and size.

The aims, per size, for each `surgery convert` row without --verify
    throughput at least 0.95 of cp&&sync's (issue 12: "convert at disk speed,
    durably"), faster than every plain way of its case, and peak RSS under
    200 MB (190.7 MiB).

How to run
    python bench/bench_convert.py                       # 1.2, 2 GB (about 15 minutes)
    python bench/bench_convert.py --sizes-gb 0.05,0.1   # quick check
    python bench/bench_convert.py --keep                # keep the temporary folder

    It prints a Markdown table and writes every run to bench/results/convert.json.
    Disk: about 12 x the largest size (each size's folder is removed before the
    next size is made, unless --keep).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _harness as harness  # noqa: E402

RESULTS = HERE / "results" / "convert.json"
CP_RATIO_TARGET = 0.95  # surgery convert throughput / cp&&sync throughput at least this
RSS_TARGET_BYTES = 200_000_000  # surgery convert peak RSS under 200 MB
SHARD_SIZE = "500MB"
PREFIX = "module."

# --------------------------------------------------------------------------- the plain ways

PLAIN_STRIP = (
    "import sys, torch, safetensors.torch\n"
    "p, out, mmap = sys.argv[1], sys.argv[2], sys.argv[3] == 'mmap'\n"
    "sd = torch.load(p, weights_only=True, mmap=mmap)\n"
    "sd = {k.removeprefix('module.'): v for k, v in sd.items()}\n"
    "safetensors.torch.save_file(sd, out)\n"
)
PLAIN_SHARD = """import json, os, sys, safetensors.torch
p, out, max_size = sys.argv[1:4]
sd = safetensors.torch.load_file(p)
try:
    from huggingface_hub import split_torch_state_dict_into_shards
    split = split_torch_state_dict_into_shards(sd, max_shard_size=max_size)
    shards, weight_map = split.filename_to_tensors, split.tensor_to_filename
except ImportError:  # the same split by hand: fill shards in order up to max bytes
    limit = int(float(max_size.removesuffix("MB")) * 10**6)
    groups, size = [[]], 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if groups[-1] and size + n > limit:
            groups.append([]); size = 0
        groups[-1].append(k); size += n
    name = "model-{:05d}-of-{:05d}.safetensors"
    shards = {name.format(i + 1, len(groups)): g for i, g in enumerate(groups)}
    weight_map = {k: f for f, g in shards.items() for k in g}
os.makedirs(out)
for fname, names in shards.items():
    safetensors.torch.save_file({k: sd[k] for k in names}, os.path.join(out, fname))
total = sum(v.numel() * v.element_size() for v in sd.values())
with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
"""
PLAIN_CAST = (
    "import sys, torch, safetensors.torch\n"
    "p, out, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])\n"
    "sd = torch.load(p, weights_only=True, mmap=True)\n"
    "sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}\n"
    "safetensors.torch.save_file(sd, out)\n"
)
CASTS = (("3 zip->st bf16", "bf16", "bfloat16"), ("4 zip->st fp16", "fp16", "float16"))
PLAIN_DIFF = """import sys, torch, safetensors.torch
a = torch.load(sys.argv[1], weights_only=True, mmap=True)
b = safetensors.torch.load_file(sys.argv[2])
for k in sorted(a.keys() | b.keys()):
    if k not in a or k not in b:
        print(k, "only in", "A" if k in a else "B"); continue
    x, y = a[k], b[k]
    if x.shape != y.shape or x.dtype != y.dtype:
        print(k, tuple(x.shape), x.dtype, tuple(y.shape), y.dtype); continue
    if not torch.equal(x, y):
        print(k, "max abs diff", (x.double() - y.double()).abs().max().item())
"""
CP_SYNC = 'cp --reflink=never "$1" "$2" && sync "$2"'


# --------------------------------------------------------------------------- checkpoint making
# Child process (`--_generate`): this process never holds torch or the tensors.


def layout(size_gb: float, per_gb: int) -> list[tuple[str, tuple[int, ...]]]:
    """~per_gb tensors per GB: bench_inspect's layout for 85% of the bytes, two big ones for the rest."""
    target = int(size_gb * 1e9)
    n = max(round(per_gb * size_gb), 6)
    body = harness.layout(n - 2, int(target * 0.85))
    width = 1024
    rows = max(int(target * 0.075) // (4 * width), 1)
    return [("embed.weight", (rows, width)), *body, ("head.weight", (rows, width))]


def generate(folder: Path, size_gb: float, per_gb: int) -> dict:
    import safetensors
    import safetensors.torch
    import torch

    t0 = time.perf_counter()
    torch.manual_seed(0)
    sd = {
        PREFIX + name: torch.empty(shape, dtype=torch.float32).normal_()
        for name, shape in layout(size_gb, per_gb)
    }
    torch.save(sd, folder / "src.pth")
    safetensors.torch.save_file(sd, str(folder / "src.safetensors"))
    sizes = sorted(t.numel() * t.element_size() for t in sd.values())
    try:
        import huggingface_hub

        hf = huggingface_hub.__version__
        from huggingface_hub import split_torch_state_dict_into_shards  # noqa: F401
    except ImportError:
        hf = None
    return {
        "num_tensors": len(sd),
        "tensor_bytes": sum(sizes),
        "largest_tensor_bytes": sizes[-1],
        "median_tensor_bytes": sizes[len(sizes) // 2],
        "file_bytes": {
            "src.pth": (folder / "src.pth").stat().st_size,
            "src.safetensors": (folder / "src.safetensors").stat().st_size,
        },
        "torch_version": torch.__version__,
        "safetensors_version": safetensors.__version__,
        "huggingface_hub_split": hf,
        "seconds_make_and_save": round(time.perf_counter() - t0, 2),
    }


# --------------------------------------------------------------------------- checking
# Child process (`--_check`): the last outputs against the source, tensor by tensor.


def _tensors(path: Path) -> dict:
    """name -> tensor, memory-mapped: a safetensors file, a sharded folder (its index) or a torch file."""
    import torch
    from safetensors import safe_open

    if path.is_dir():
        index = json.loads(next(path.glob("*.index.json")).read_text())
        out, handles = {}, {}
        for name, fname in index["weight_map"].items():
            f = handles.setdefault(fname, safe_open(str(path / fname), "pt"))
            out[name] = f.get_tensor(name)
        return out
    if path.suffix == ".safetensors":
        f = safe_open(str(path), "pt")
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return torch.load(path, weights_only=True, mmap=True)


def _same(a, b) -> bool:
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def check(job: dict) -> list[dict]:
    import torch

    folder = Path(job["folder"])
    src = torch.load(folder / "src.pth", weights_only=True, mmap=True)
    stripped = {k.removeprefix(PREFIX): v for k, v in src.items()}
    results = []

    def compare(label, path, expected, against=None, order=False):
        try:
            _compare(label, path, expected, against, order)
        except Exception as exc:  # a missing or unreadable output: reported, the other checks still run
            results.append({"label": label, "output": path.name, "ok": False, "error": repr(exc)})

    def _compare(label, path, expected, against, order):
        got = _tensors(path)
        res = {"label": label, "output": path.name, "num_tensors": len(got)}
        res["keys_equal"] = set(got) == set(expected)
        res["key_order_equal"] = list(got) == list(expected)
        res["differ"] = [k for k in got if k in expected and not _same(got[k], expected[k])][:10]
        if against is not None:  # the plain way's output: bit-identical?
            other = _tensors(against)
            res["plain_keys_equal"] = set(other) == set(got)
            res["differ_from_plain"] = [k for k in got if k in other and not _same(got[k], other[k])][:10]
        res["ok"] = res["keys_equal"] and not res["differ"] and not res.get("differ_from_plain")
        if order:
            res["ok"] = res["ok"] and res["key_order_equal"]
        if path.is_dir():
            shards = sorted(p for p in path.glob("*.safetensors"))
            res["shards"] = len(shards)
            res["largest_shard_bytes"] = max(p.stat().st_size for p in shards)
            if against is not None:
                res["plain_shards"] = len(list(against.glob("*.safetensors")))
        results.append(res)

    compare(
        "1 strip-prefix", folder / "c1_surgery.safetensors", stripped, folder / "c1_plain_mmap.safetensors"
    )
    compare("1 strip-prefix --verify", folder / "c1_verify.safetensors", stripped)
    # order=False: safetensors stores names sorted, so file order is not the source's (nor the plain way's)
    compare("2 shards", folder / "c2_surgery", src, folder / "c2_plain")
    for case, short, dtype in CASTS:
        cast = {k: v.to(getattr(torch, dtype)) for k, v in src.items()}
        n = case[0]
        compare(
            f"{n} {short}", folder / f"c{n}_surgery.safetensors", cast, folder / f"c{n}_plain.safetensors"
        )
    for extra in ([], ["--structure-only"]):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "surgery",
                "diff",
                str(folder / "src.pth"),
                str(folder / "src.safetensors"),
                "--json",
            ]
            + extra,
            capture_output=True,
            text=True,
        )
        res = {"label": "diff" + (" --structure-only" if extra else ""), "exit": proc.returncode}
        try:
            data = json.loads(proc.stdout)
            res.update(same=data.get("same"), summary=data.get("summary"), bytes_read=data.get("bytes_read"))
        except json.JSONDecodeError:
            res["stderr"] = proc.stderr[-500:]
        res["ok"] = proc.returncode == 0 and res.get("same") is True
        results.append(res)
    return results


# --------------------------------------------------------------------------- commands


def commands(folder: Path, size_gb: float, floors: bool) -> list[dict]:
    py = sys.executable
    src, sst = folder / "src.pth", folder / "src.safetensors"
    rows: list[dict] = []

    def add(case, label, kind, argv, out=None, source=src, note=""):
        name = source.name if source else None
        rows.append(harness.row(label, kind, argv, out, note, size_gb=size_gb, case=case, source=name))

    surgery = [py, "-m", "surgery"]
    c = "1 zip->st strip"
    out = folder / "c1_surgery.safetensors"
    add(
        c,
        "surgery convert --strip-prefix module.",
        "surgery",
        [*surgery, "convert", src, "-o", out, "--strip-prefix", PREFIX],
        out,
    )
    out = folder / "c1_verify.safetensors"
    add(
        c,
        "surgery convert --strip-prefix module. --verify",
        "surgery-verify",
        [*surgery, "convert", src, "-o", out, "--strip-prefix", PREFIX, "--verify"],
        out,
        note="re-reads the output and compares: shown, not judged",
    )
    out = folder / "c1_cp.pth"
    add(c, "cp --reflink=never [physical limit]", "cp", ["cp", "--reflink=never", src, out], out)
    out = folder / "c1_cp_auto.pth"
    add(c, "cp [coreutils default: copy_file_range]", "ref", ["cp", src, out], out)
    out = folder / "c1_cp_sync.pth"
    add(c, "cp --reflink=never && sync OUT [fsynced]", "cp-sync", ["sh", "-c", CP_SYNC, "sh", src, out], out)
    for mode in ("mmap", "nommap"):
        out = folder / f"c1_plain_{mode}.safetensors"
        add(
            c,
            f"torch.load(mmap={mode == 'mmap'}) + strip + save_file",
            "plain",
            [py, "-c", PLAIN_STRIP, src, out, mode],
            out,
        )

    c = "2 st->shards"
    out = folder / "c2_surgery"
    add(
        c,
        f"surgery convert --shard-size {SHARD_SIZE}",
        "surgery",
        [*surgery, "convert", sst, "-o", out, "--shard-size", SHARD_SIZE],
        out,
        sst,
    )
    out = folder / "c2_cp.safetensors"
    add(c, "cp --reflink=never [physical limit]", "cp", ["cp", "--reflink=never", sst, out], out, sst)
    out = folder / "c2_cp_sync.safetensors"
    add(
        c,
        "cp --reflink=never && sync OUT [fsynced]",
        "cp-sync",
        ["sh", "-c", CP_SYNC, "sh", sst, out],
        out,
        sst,
    )
    out = folder / "c2_plain"
    add(
        c,
        "load_file + split_torch_state_dict_into_shards + save_file x N + index",
        "plain",
        [py, "-c", PLAIN_SHARD, sst, out, SHARD_SIZE],
        out,
        sst,
    )

    for c, short, dtype in CASTS:
        out = folder / f"c{c[0]}_surgery.safetensors"
        # fp16 flushes the tiniest random values to zero, as the plain way does silently: allowed by name
        lossy = ["--allow-lossy-cast"] if short == "fp16" else []
        add(
            c,
            " ".join(["surgery convert --dtype", short, *lossy]),
            "surgery",
            [*surgery, "convert", src, "-o", out, "--dtype", short, *lossy],
            out,
        )
        out = folder / f"c{c[0]}_plain.safetensors"
        add(
            c,
            f"torch.load(mmap=True) + .to({dtype}) + save_file",
            "plain",
            [py, "-c", PLAIN_CAST, src, out, dtype],
            out,
        )

    c = "5 diff"
    add(c, "surgery diff A B", "surgery-diff", [*surgery, "diff", src, sst])
    add(
        c,
        "torch.load(mmap=True) + load_file + torch.equal per key",
        "plain",
        [py, "-c", PLAIN_DIFF, src, sst],
    )
    c = "6 diff --structure-only"
    add(
        c,
        "surgery diff --structure-only A B",
        "surgery-diff",
        [*surgery, "diff", "--structure-only", src, sst],
    )

    if floors:
        add("-", "python -c 'import torch' [import floor]", "floor", [py, "-c", "import torch"], source=None)
        rows += harness.measurement_floor(size_gb=size_gb, case="-", source=None)
    return rows


# --------------------------------------------------------------------------- reporting


def derive(rows: list[dict], file_bytes: dict[str, int]) -> None:
    """Throughput, ratios vs cp and vs cp&&sync, and speed-up vs plain, per row (same size)."""
    for r in rows:
        if r.get("failed") or not r["source"]:
            continue
        r["source_bytes"] = file_bytes[r["source"]]
        r["mb_per_s"] = r["source_bytes"] / 1e6 / r["median_s"]
    for r in rows:
        if "mb_per_s" not in r or "diff" in r["case"]:
            continue
        for kind, field in (("cp", "vs_cp"), ("cp-sync", "vs_cp_sync")):
            ref = next(
                (c for c in rows if c["kind"] == kind and c["source"] == r["source"] and not c.get("failed")),
                None,
            )
            if ref:
                r[field] = r["mb_per_s"] / ref["mb_per_s"]
    for r in rows:
        if r["kind"] in ("plain", "floor", "launcher") or r.get("failed"):
            continue
        plains = [p for p in rows if p["case"] == r["case"] and p["kind"] == "plain" and not p.get("failed")]
        if plains:
            r["speedup_each_plain"] = {p["command"]: p["median_s"] / r["median_s"] for p in plains}
            r["speedup"] = min(p["median_s"] for p in plains) / r["median_s"]


def table(rows: list[dict]) -> str:
    head = [
        "size GB",
        "case",
        "command",
        "median wall s",
        "MB/s",
        "peak RSS MiB",
        "vs cp",
        "vs cp&&sync",
        "speed-up vs plain",
    ]
    body = []
    for r in rows:
        size = "-" if r["case"] == "-" else f"{r['size_gb']:g}"
        if r.get("failed"):
            body.append([size, r["case"], f"`{r['command']}`", f"FAILED ({r['failed']})", *["-"] * 5])
            continue
        speed = r.get("speedup")
        body.append(
            [
                size,
                r["case"],
                f"`{r['command']}`",
                f"{r['median_s']:.3f}",
                harness.cell(r.get("mb_per_s"), ".0f"),
                f"{harness.mib(r['max_rss_kib']):.1f}",
                harness.cell(r.get("vs_cp"), ".2f"),
                harness.cell(r.get("vs_cp_sync"), ".2f"),
                "-" if speed is None else f"{speed:.2f}x",
            ]
        )
    return harness.markdown_table(head, "rllrrrrrr", body)


def growth_table(grow: list[dict]) -> str:
    head = ["case", "command", "wall s at 0 GB", "wall s per GB", "RSS MiB at 0 GB", "RSS MiB per GB"]
    body = (
        [
            g["case"],
            f"`{g['command']}`",
            harness.cell(g["wall_s_at_0"], ".3f"),
            harness.cell(g["wall_s_per_gb"], ".3f"),
            harness.cell(g["rss_mib_at_0"], ".1f"),
            harness.cell(g["rss_mib_per_gb"], ".1f"),
        ]
        for g in grow
    )
    return harness.markdown_table(head, "llrrrr", body)


def fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares line y = a + b x: (a, b)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def growth(rows: list[dict], sizes_bytes: dict[float, int]) -> list[dict]:
    """Per (case, command): wall time and peak RSS against the checkpoint size in GB, a line fit."""
    out = []
    keys = []
    for r in rows:
        if r["case"] != "-" and (r["case"], r["command"]) not in keys:
            keys.append((r["case"], r["command"]))
    for case, command in keys:
        rs = [r for r in rows if r["case"] == case and r["command"] == command and not r.get("failed")]
        xs = [sizes_bytes[r["size_gb"]] / 1e9 for r in rs]
        t, m = fit(xs, [r["median_s"] for r in rs]), fit(xs, [harness.mib(r["max_rss_kib"]) for r in rs])
        out.append(
            {
                "case": case,
                "command": command,
                "gb": xs,
                "wall_s": [r["median_s"] for r in rs],
                "peak_rss_mib": [round(harness.mib(r["max_rss_kib"]), 1) for r in rs],
                "wall_s_at_0": t and t[0],
                "wall_s_per_gb": t and t[1],
                "rss_mib_at_0": m and m[0],
                "rss_mib_per_gb": m and m[1],
            }
        )
    return out


def strace_cp(folder: Path, src: Path) -> dict:
    """Which system calls cp uses to copy here, with and without --reflink=never (strace -c)."""
    res = {}
    if not shutil.which("strace"):
        return {"strace": "not available"}
    for mode in ("auto", "never"):
        out = folder / f"strace_cp_{mode}"
        proc = subprocess.run(
            [
                "strace",
                "-f",
                "-c",
                "-e",
                "trace=copy_file_range,ioctl,read,write,sendfile",
                "cp",
                f"--reflink={mode}",
                str(src),
                str(out),
            ],
            capture_output=True,
            text=True,
        )
        calls = {}
        for line in proc.stderr.splitlines():
            parts = line.split()
            if parts and parts[-1] in ("copy_file_range", "ioctl", "read", "write", "sendfile"):
                nums = [p for p in parts[:-1] if p.replace(".", "").isdigit()]
                errors = int(nums[4]) if len(nums) == 5 else 0
                calls[parts[-1]] = {"calls": int(nums[3]), "errors": errors}
        res[f"--reflink={mode}"] = calls
        out.unlink(missing_ok=True)
    return res


def judge(rows: list[dict]) -> list[dict]:
    """Each surgery convert row against the aims: throughput vs cp&&sync, faster than every plain
    way of its case, peak RSS."""
    aims = []
    for r in rows:
        if r["kind"] != "surgery":
            continue
        ok_cp = r.get("vs_cp_sync") is not None and r["vs_cp_sync"] >= CP_RATIO_TARGET
        ok_speed = r.get("speedup") is not None and r["speedup"] > 1.0
        ok_rss = not r.get("failed") and r["max_rss_kib"] * 1024 < RSS_TARGET_BYTES
        aims.append(
            {
                "size_gb": r["size_gb"],
                "case": r["case"],
                "command": r["command"],
                "vs_cp": r.get("vs_cp"),
                "vs_cp_sync": r.get("vs_cp_sync"),
                "cp_sync_ok": ok_cp,
                "speedup_vs_fastest_plain": r.get("speedup"),
                "speedup_each_plain": r.get("speedup_each_plain"),
                "faster_ok": ok_speed,
                "peak_rss_mib": harness.mib(r["max_rss_kib"]),
                "rss_ok": ok_rss,
                "all_ok": ok_cp and ok_speed and ok_rss,
            }
        )
    return aims


# --------------------------------------------------------------------------- the run


def main() -> int:
    parser = harness.benchmark_parser(__doc__, "generate", "check")
    parser.add_argument(
        "--sizes-gb", default="1.2,2", help="checkpoint sizes in GB (10^9 bytes), comma-separated"
    )
    parser.add_argument("--tensors-per-gb", type=int, default=300, help="tensors per GB of checkpoint")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    parser.add_argument("--_size-gb", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._generate:
        return harness.reply(generate(Path(args._generate), args._size_gb, args.tensors_per_gb))
    if args._check:
        return harness.reply(check(json.loads(Path(args._check).read_text())))

    sizes = [float(s) for s in args.sizes_gb.split(",") if s.strip()]
    top = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    problems: list[str] = []
    try:
        fs = subprocess.run(
            ["stat", "-f", "-c", "%T", str(top)], capture_output=True, text=True
        ).stdout.strip()
        fs_tmp = subprocess.run(
            ["stat", "-f", "-c", "%T", "/tmp"], capture_output=True, text=True
        ).stdout.strip()
        print(f"temporary folder {top} on {fs} (/tmp: {fs_tmp})", flush=True)
        if fs == "tmpfs":
            problems.append(f"the temporary folder {top} is on tmpfs (memory), not disk: set TMPDIR")
        env, bytecode = harness.child_env(top, args.env_as_is)
        watch = harness.Watch("the run")
        all_rows: list[dict] = []
        inputs: dict[str, dict] = {}
        checks: dict[str, list] = {}
        cp_syscalls = None
        clear_refs_ok = True
        for i, size in enumerate(sizes):
            folder = top / f"{size:g}GB"
            folder.mkdir()
            print(f"[{size:g} GB] making the checkpoint in {folder} ...", flush=True)
            gen = [
                "--_generate",
                str(folder),
                "--_size-gb",
                str(size),
                "--tensors-per-gb",
                str(args.tensors_per_gb),
            ]
            facts = harness.child(__file__, gen)
            inputs[f"{size:g}"] = facts
            print(
                f"  {facts['num_tensors']} tensors, {facts['tensor_bytes'] / 1e9:.3f} GB float32 (largest "
                f"{facts['largest_tensor_bytes'] / 2**20:.0f} MiB, median {facts['median_tensor_bytes'] / 2**10:.0f} KiB); "
                f"made and saved in {facts['seconds_make_and_save']} s",
                flush=True,
            )
            if cp_syscalls is None:
                cp_syscalls = strace_cp(folder, folder / "src.pth")
                print(f"  cp system calls here: {cp_syscalls}", flush=True)
            rows = commands(folder, size, floors=i == 0)
            clear_refs_ok &= harness.run_all(rows, folder, env, sync=True)
            problems += harness.summarize(rows, count_warmup=True)
            derive(rows, facts["file_bytes"])
            print("  checking the outputs ...", flush=True)
            checks[f"{size:g}"] = harness.check_in_child(__file__, folder, {"folder": str(folder)})
            for c in checks[f"{size:g}"]:
                if not c["ok"]:
                    problems.append(f"check {size:g} GB {c['label']}: {c}")
            print(table(rows), flush=True)
            for r in rows:
                r["argv"] = [harness.shown(a, folder) for a in r["argv"]]
                r["outputs"] = [harness.shown(a, folder) for a in r["outputs"]]
            all_rows += rows
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        watch.stop()
        problems += watch.problems()

        aims = judge(all_rows)
        sizes_bytes = {s: inputs[f"{s:g}"]["file_bytes"]["src.pth"] for s in sizes}
        grow = growth(all_rows, sizes_bytes)
        first = inputs[f"{sizes[0]:g}"]
        mach = harness.machine(top, first)
        mach["huggingface_hub_split"] = first["huggingface_hub_split"]

        harness.print_context(
            mach, bytecode, watch, also={"huggingface_hub": mach["huggingface_hub_split"]}, warm="sources"
        )
        print(f"cp system calls (strace -c): {cp_syscalls}")
        print()
        print(table(all_rows))
        print()
        print(
            "Growth with size (least-squares line over the sizes; wall s and peak RSS MiB per GB of src file):"
        )
        print()
        print(growth_table(grow))
        print()
        harness.print_clear_refs_warning(clear_refs_ok)
        for a in aims:
            print(
                f"- aim {a['size_gb']:g} GB {a['case']} `{a['command']}`: vs cp&&sync "
                f"{harness.cell(a['vs_cp_sync'], '.2f')} (>= {CP_RATIO_TARGET}: "
                f"{'met' if a['cp_sync_ok'] else 'MISSED'}), speed-up vs fastest plain "
                f"{harness.cell(a['speedup_vs_fastest_plain'], '.2f')}x ({'met' if a['faster_ok'] else 'MISSED'}), "
                f"peak RSS {a['peak_rss_mib']:.1f} MiB (< 200 MB = 190.7 MiB: {'met' if a['rss_ok'] else 'MISSED'})"
            )
        for size, cs in checks.items():
            for c in cs:
                print(
                    f"- check {size} GB {c['label']}: {'ok' if c['ok'] else 'FAILED'}"
                    + (f" ({c.get('shards')} shards, plain {c.get('plain_shards')})" if "shards" in c else "")
                )

        row_fields = (
            "size_gb",
            "case",
            "command",
            "kind",
            "source",
            "source_bytes",
            "argv",
            "outputs",
            "note",
            "median_s",
            "max_rss_kib",
            "mb_per_s",
            "vs_cp",
            "vs_cp_sync",
            "speedup",
            "speedup_each_plain",
            "failed",
            "warmup",
            "runs",
        )
        return harness.finish(
            RESULTS,
            {
                **harness.results_head("convert", mach, watch),
                "params": {
                    "sizes_gb": sizes,
                    "tensors_per_gb": args.tensors_per_gb,
                    "shard_size": SHARD_SIZE,
                    **harness.measuring_params(args.env_as_is, bytecode),
                },
                "inputs": inputs,
                "cp_syscalls": cp_syscalls,
                "physical_limit": "cp --reflink=never",
                "durable_reference": CP_SYNC,
                "throughput": "source file bytes / median wall time, MB/s (10^6)",
                **harness.measuring_method(clear_refs_ok),
                "rows": [
                    {k: r.get(k) for k in row_fields}
                    | {"peak_rss_mib": round(harness.mib(r["max_rss_kib"]), 2)}
                    for r in all_rows
                ],
                "growth": grow,
                "aims": {
                    "cp_sync_throughput_ratio_at_least": CP_RATIO_TARGET,
                    "faster_than_plain": True,
                    "peak_rss_under_bytes": RSS_TARGET_BYTES,
                    "results": aims,
                    "all_met": all(a["all_ok"] for a in aims),
                },
                "checks": checks,
                "problems": problems,
                "table_markdown": table(all_rows),
            },
        )
    finally:
        if args.keep:
            print(f"kept {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
