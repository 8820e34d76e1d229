"""Benchmark `surgery convert` of a DeepSpeed ZeRO checkpoint against DeepSpeed's own `zero_to_fp32.py`.

What it measures
    Wall time and peak RSS of separate child processes that consolidate one DeepSpeed ZeRO
    checkpoint into one fp32 .safetensors file. The checkpoints are written by DeepSpeed itself
    (`torchrun --standalone --nproc-per-node 2`, CPU accelerator, gloo): a stack of
    ``--layers`` ``nn.Linear(--width, --width)``, one Adam step (``torch_adam``), then
    ``engine.save_checkpoint``, for each stage of ``--stages`` (2 and 3 by default).

    Rows, for each stage:

    * surgery::

          python -m surgery convert zeroN -o surgery.safetensors

    * DeepSpeed, the script `save_checkpoint` copies beside the checkpoint::

          python zeroN/zero_to_fp32.py zeroN out/ --safe_serialization --max_shard_size 1000GB

    and the floors ``python -c 'import torch'`` and ``python -c 'import deepspeed'`` (what each
    side pays before it reads a byte).

    Measured with ``_harness.py`` as bench_merge.py: one warm-up then 3 timed runs round-robin,
    each command in its own child (peak RSS reset before ``exec``); outputs deleted and
    ``sync()`` before each run, outside the timing; the checkpoint warm in the page cache.
    After the runs a checker child compares surgery's output with DeepSpeed's tensor by tensor
    (same names, dtypes, shapes, bytes). A failed command or any difference is a PROBLEM
    (exit code 1).

The aim (issue 16, "DeepSpeed ZeRO consolidation")
    Peak memory bounded by a few tensors, not the model: surgery's peak RSS above the
    ``import torch`` floor at most ``MEMORY_AIM`` (8) times the largest tensor (convert assembles
    one tensor and its writer queues up to 3 pieces of at most 16 MiB), where zero_to_fp32 holds
    the whole model; output bit-identical to zero_to_fp32's. A parameter lying whole in one
    rank's partition (most of them at stages 1 and 2) is copied file to file without torch.

How to run
    python bench/bench_zero.py                             # 32 x 1024^2 (128 MiB fp32), a few minutes
    python bench/bench_zero.py --layers 2 --width 1024     # quick check

    Needs deepspeed (`pip install deepspeed`). It prints a Markdown table and writes the same
    numbers to bench/results/zero.json. Everything goes to a temporary folder removed at the end
    (about 5 x the model's fp32 bytes per stage: the module and the Adam states are saved too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _harness import child_env, code_state, finish, mib, run_all, summarize  # noqa: E402

RESULTS = HERE / "results" / "zero.json"
MEMORY_AIM = 8  # surgery's peak above the import torch floor, in largest tensors

TRAIN = textwrap.dedent(
    """
    import sys

    import deepspeed
    import torch
    from torch import nn

    out, layers, width, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    for stage in map(int, stages.split(",")):
        torch.manual_seed(stage)
        model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
        }
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        engine.backward(engine(torch.randn(2, width)).pow(2).mean())
        engine.step()
        engine.save_checkpoint(f"{out}/zero{stage}")
    """
)

CHECK = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors import safe_open

    a, b = safe_open(sys.argv[1], "pt"), safe_open(sys.argv[2], "pt")
    names = list(a.keys())
    same = names == list(b.keys()) or sorted(names) == sorted(b.keys())
    differ = [n for n in names if same and not torch.equal(a.get_tensor(n), b.get_tensor(n))]
    print(json.dumps({"tensors": len(names), "names_equal": same, "differ": differ}))
    """
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--stages", default="2,3")
    args = parser.parse_args()
    py = sys.executable
    folder = Path(tempfile.mkdtemp(prefix="bench_zero_"))
    try:
        print(f"DeepSpeed writes the checkpoints in {folder} ...", flush=True)
        (folder / "train.py").write_text(TRAIN)
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        made = subprocess.run(
            [*torchrun, "train.py", str(folder), str(args.layers), str(args.width), args.stages],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
        )
        if made.returncode:
            sys.stderr.write(made.stderr[-4000:])
            return 1
        model_bytes = 4 * args.layers * (args.width * args.width + args.width)
        tensor_bytes = 4 * args.width * args.width
        child, bytecode = child_env(folder, False)
        child["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), child.get("PYTHONPATH")]))
        child.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        rows = []
        for stage in args.stages.split(","):
            ckpt = folder / f"zero{stage}"
            ours, theirs = folder / f"surgery{stage}.safetensors", folder / f"ds{stage}"
            rows.append(
                {
                    "stage": stage,
                    "kind": "surgery",
                    "command": f"surgery convert zero{stage} -o out.safetensors",
                    "argv": [py, "-m", "surgery", "convert", str(ckpt), "-o", str(ours)],
                    "outputs": [str(ours)],
                }
            )
            rows.append(
                {
                    "stage": stage,
                    "kind": "zero_to_fp32",
                    "command": f"python zero{stage}/zero_to_fp32.py zero{stage} out/ --safe_serialization",
                    "argv": [
                        py,
                        str(ckpt / "zero_to_fp32.py"),
                        str(ckpt),
                        str(theirs),
                        "--safe_serialization",
                        "--max_shard_size",
                        "1000GB",
                    ],  # fmt: skip
                    "outputs": [str(theirs)],
                }
            )
        for label, code in (("torch", "import torch"), ("deepspeed", "import deepspeed")):
            rows.append(
                {
                    "stage": "-",
                    "kind": f"floor {label}",
                    "command": f"python -c '{code}'",
                    "argv": [py, "-c", code],
                }
            )
        before = code_state()
        run_all(rows, folder, child, sync=True)
        problems = summarize(rows, count_warmup=True)
        floor = next(r["max_rss_kib"] for r in rows if r["kind"] == "floor torch") * 1024
        checks = {}
        for stage in args.stages.split(","):
            ours = folder / f"surgery{stage}.safetensors"
            theirs = folder / f"ds{stage}" / "model.safetensors"
            proc = subprocess.run([py, "-c", CHECK, str(ours), str(theirs)], capture_output=True, text=True)
            checks[stage] = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-400:]}
            if proc.returncode or checks[stage]["differ"] or not checks[stage]["names_equal"]:
                problems.append(f"stage {stage}: outputs differ: {checks[stage]}")
        print(
            f"\nmodel: {args.layers} x Linear({args.width}, {args.width}), {mib(model_bytes / 1024):.0f} MiB fp32, "
            f"largest tensor {mib(tensor_bytes / 1024):.0f} MiB, 2 data-parallel ranks. Bytecode cache: {bytecode}."
        )
        print("\n| stage | command | median wall s | peak RSS MiB | above import torch MiB |")
        print("|---|---|---:|---:|---:|")
        for r in rows:
            above = (r["max_rss_kib"] * 1024 - floor) / 2**20
            print(
                f"| {r['stage']} | `{r['command']}` | {r['median_s']:.2f} | {mib(r['max_rss_kib']):.0f} | "
                f"{above:.0f} |"
            )
            if r["kind"] == "surgery":
                r["above_floor_in_tensors"] = (r["max_rss_kib"] * 1024 - floor) / tensor_bytes
                if r["above_floor_in_tensors"] > MEMORY_AIM:
                    problems.append(
                        f"stage {r['stage']}: surgery's peak is over {MEMORY_AIM} tensors above the floor"
                    )
        for stage, c in checks.items():
            print(f"- stage {stage}: {c}")
        doc = {
            "model": {"layers": args.layers, "width": args.width, "fp32_bytes": model_bytes},
            "rows": [{k: v for k, v in r.items() if k != "argv"} for r in rows],
            "checks": checks,
            "code": before,
            "problems": problems,
        }
        RESULTS.parent.mkdir(exist_ok=True)
        return finish(RESULTS, doc)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
