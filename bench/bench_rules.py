"""Benchmark `surgery port` with a rule file against the plain way: Meta Llama -> Hugging Face Llama.

What it measures
    Wall time and peak RSS of separate child processes that turn a Meta-layout
    Llama checkpoint (one ``consolidated.00.pth`` as Meta ships it, here
    ``meta.pth``) into the Hugging Face ``LlamaForCausalLM`` layout, written as
    one .safetensors file. The checkpoint is made by a child process:
    ``torch.manual_seed(0)``, float32 normal values, Meta's names and shapes
    (``tok_embeddings.weight`` [V, D]; per layer ``attention.{wq,wk,wv,wo}``
    with grouped-query sizes, ``wk``/``wv`` rows = n_kv_heads * head_dim;
    ``feed_forward.{w1,w2,w3}``; ``attention_norm``, ``ffn_norm``; then
    ``norm.weight``, ``output.weight``), saved with ``torch.save``; beside it
    Meta's ``params.json`` and a Hugging Face ``config.json`` (hidden_size,
    num_hidden_layers, num_attention_heads, num_key_value_heads,
    intermediate_size, vocab_size, rms_norm_eps, untied embeddings). Default
    configuration: dim 1024, 16 layers, 16 heads, 4 key/value heads, FFN 2816,
    vocabulary 32000: 245.8 M parameters, 0.98 GB of float32.

    Rows:

    * surgery, strict (every target key must be filled, every source key used)::

          python -m surgery port meta.pth --to 'hf:LlamaForCausalLM?config=hf' \\
              --preset llama-meta-to-hf -o surgery.safetensors

      the preset shipped in the package (``surgery/presets/``); ``--rules FILE``
      (for development) uses a copy of FILE in the temporary folder instead, as
      ``--map``. Every tensor comes from the source, so port builds the target
      on the meta device (shapes and dtypes, no values).
    * the plain way, as transformers' ``convert_llama_weights_to_hf.py`` does it
      (heads read from ``params.json``), twice: ``mmap=False`` and ``mmap=True``::

          loaded = torch.load(p, map_location="cpu", mmap=False, weights_only=True)
          def permute(w, heads):
              rows, cols = w.shape
              return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
          sd = {"model.embed_tokens.weight": loaded["tok_embeddings.weight"], ...}
          sd[f"model.layers.{n}.self_attn.q_proj.weight"] = permute(loaded[...wq...], n_heads)
          sd[f"model.layers.{n}.self_attn.k_proj.weight"] = permute(loaded[...wk...], n_kv_heads)
          ...                                                   # the other keys renamed
          safetensors.torch.save_file(sd, out)

    * references: surgery's target alone as port builds it
      (``build_target('hf:LlamaForCausalLM?config=hf', meta=True)`` in
      ``python -c``: importing torch and transformers and describing the model,
      nothing read), the same target built for real (the randomly initialised
      model in memory, what a port loading into the model would hold),
      ``import torch, transformers`` + ``LlamaForCausalLM`` (the target's import
      floor), ``import torch`` (the plain way's import floor) and ``true`` (the
      measurement floor).

    Measured with the shared machinery (_harness.py), as bench_port.py: each
    command in its own child process forked by a lean ``python -S -I`` runner,
    peak RSS reset before ``exec`` and read with ``os.wait4`` (``ru_maxrss``,
    file-backed pages included); one warm-up, then 3 timed runs round-robin;
    median wall time, max peak RSS. Before every run, outside the timing, the
    command's output is deleted and ``sync()`` called. The page cache is not
    dropped: the source is read warm. surgery fsyncs its output and hashes the
    source (sha256) for its provenance; the plain way does neither, and those
    costs count as surgery's.

    After the timed runs a checker child process opens the last outputs (outside
    the timing) and compares them tensor by tensor: the same keys, dtypes,
    shapes and bytes (bit-identical), and every output tensor against the
    source tensor it came from (renamed ones byte for byte, ``q_proj``/``k_proj``
    against the permuted source). The run records the code measured and the CPU
    anything else used meanwhile, as bench_port.py; a failed command, a mismatch,
    other processes using more than 5% of a CPU or surgery's code changing
    mid-run is a PROBLEM (exit code 1).

The aim (issue 13, "Memory")
    surgery no slower than the plain way (time ratio <= 1.0) and under half its
    peak memory (memory ratio <= 0.5), against the plain ``mmap=False`` row; the
    ``mmap=True`` ratios are shown too. surgery's peak and time are also set
    beside the target's import floor and its target as built, to say what the
    port itself adds.

How to run
    python bench/bench_rules.py                           # ~1 GB, about 3 minutes
    python bench/bench_rules.py --layers 2 --vocab 4000   # quick check
    python bench/bench_rules.py --rules PATH.toml         # a rule file instead of the shipped preset

    It prints a Markdown table and writes the same numbers to
    bench/results/rules.json. Inputs and outputs go to a fresh temporary folder
    (about 3 x the checkpoint) that is removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
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
sys.path.insert(1, str(REPO))  # the checker and the preset lookup read this checkout's surgery

from _harness import (  # noqa: E402
    RUNS,
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

RESULTS = HERE / "results" / "rules.json"
PRESET = "llama-meta-to-hf"
TIME_TARGET = 1.0  # surgery/plain wall time at most this ("no slower")
MEMORY_TARGET = 0.5  # surgery/plain peak RSS at most this ("under half the memory")
OTHER_CPU_LIMIT = 0.05  # CPU-seconds used by other processes per second of timed runs, before a warning

SOURCE = "meta.pth"
PARAMS = "params.json"
HF_DIR = "hf"
TARGET = "hf:LlamaForCausalLM?config={folder}"


# --------------------------------------------------------------------------- checkpoint making
# Child process (`--_generate`): this process never holds torch or the tensors.


def meta_layout(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Meta's reference Llama state_dict: names and shapes, in its module order."""
    dim, heads, kv, ffn, vocab = (
        config[k] for k in ("dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")
    )
    head_dim = dim // heads
    layout = [("tok_embeddings.weight", (vocab, dim))]
    for n in range(config["n_layers"]):
        p = f"layers.{n}."
        layout += [
            (p + "attention.wq.weight", (heads * head_dim, dim)),
            (p + "attention.wk.weight", (kv * head_dim, dim)),
            (p + "attention.wv.weight", (kv * head_dim, dim)),
            (p + "attention.wo.weight", (dim, heads * head_dim)),
            (p + "feed_forward.w1.weight", (ffn, dim)),
            (p + "feed_forward.w2.weight", (dim, ffn)),
            (p + "feed_forward.w3.weight", (ffn, dim)),
            (p + "attention_norm.weight", (dim,)),
            (p + "ffn_norm.weight", (dim,)),
        ]
    return layout + [("norm.weight", (dim,)), ("output.weight", (vocab, dim))]


def hf_config(config: dict) -> dict:
    """The transformers config.json of the same model (what `hf:LlamaForCausalLM?config=DIR` reads)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config["dim"],
        "num_hidden_layers": config["n_layers"],
        "num_attention_heads": config["n_heads"],
        "num_key_value_heads": config["n_kv_heads"],
        "intermediate_size": config["ffn_dim"],
        "vocab_size": config["vocab_size"],
        "rms_norm_eps": config["norm_eps"],
        "tie_word_embeddings": False,
    }


def generate(folder: Path, config: dict) -> dict:
    import safetensors
    import torch
    import transformers

    t0 = time.perf_counter()
    torch.manual_seed(0)
    sd = {name: torch.empty(shape, dtype=torch.float32).normal_() for name, shape in meta_layout(config)}
    torch.save(sd, folder / SOURCE)
    params = {k: config[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps")}
    (folder / PARAMS).write_text(json.dumps(params))  # as Meta ships it beside consolidated.00.pth
    (folder / HF_DIR).mkdir()
    (folder / HF_DIR / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    return {
        "torch_version": torch.__version__,
        "safetensors_version": safetensors.__version__,
        "transformers_version": transformers.__version__,
        "num_tensors": len(sd),
        "parameters": sum(t.numel() for t in sd.values()),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in sd.values()),
        "source_bytes": (folder / SOURCE).stat().st_size,
        "dtype": "float32",
        "seconds_make": round(time.perf_counter() - t0, 2),
    }


# --------------------------------------------------------------------------- the plain way

PLAIN = """\
import json, sys, torch, safetensors.torch
src, params, out, mmap = sys.argv[1:5]
params = json.load(open(params))
n_heads = params["n_heads"]
n_kv_heads = params.get("n_kv_heads", n_heads)
def permute(w, heads):  # transformers' convert_llama_weights_to_hf.py
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
loaded = torch.load(src, map_location="cpu", mmap=mmap == "mmap", weights_only=True)
sd = {
    "model.embed_tokens.weight": loaded["tok_embeddings.weight"],
    "model.norm.weight": loaded["norm.weight"],
    "lm_head.weight": loaded["output.weight"],
}
for n in range(params["n_layers"]):
    a, m = f"layers.{n}.", f"model.layers.{n}."
    sd[m + "self_attn.q_proj.weight"] = permute(loaded[a + "attention.wq.weight"], n_heads)
    sd[m + "self_attn.k_proj.weight"] = permute(loaded[a + "attention.wk.weight"], n_kv_heads)
    sd[m + "self_attn.v_proj.weight"] = loaded[a + "attention.wv.weight"]
    sd[m + "self_attn.o_proj.weight"] = loaded[a + "attention.wo.weight"]
    sd[m + "mlp.gate_proj.weight"] = loaded[a + "feed_forward.w1.weight"]
    sd[m + "mlp.down_proj.weight"] = loaded[a + "feed_forward.w2.weight"]
    sd[m + "mlp.up_proj.weight"] = loaded[a + "feed_forward.w3.weight"]
    sd[m + "input_layernorm.weight"] = loaded[a + "attention_norm.weight"]
    sd[m + "post_attention_layernorm.weight"] = loaded[a + "ffn_norm.weight"]
safetensors.torch.save_file(sd, out)
"""

# surgery's target alone: build_target as port calls it (meta=True: shapes and dtypes, no
# values, since every tensor comes from the source), and built for real for comparison.
TARGET_ALONE = """\
import sys
from surgery.models.targets import build_target
build_target(sys.argv[1], meta=sys.argv[2] == "meta")
"""

# --------------------------------------------------------------------------- checking
# Child process (`--_check`): both outputs and the source, memory-mapped.

RENAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_RENAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def hf_name(meta: str) -> str:
    if meta in RENAMES:
        return RENAMES[meta]
    _, n, rest = meta.split(".", 2)
    return f"model.layers.{n}.{LAYER_RENAMES[rest]}"


def check(job: dict) -> dict:
    """surgery's output against the plain output (bit for bit) and against the source."""
    import torch
    from safetensors import safe_open

    from surgery.formats.tensors import same_bytes

    def permute(w, heads: int):
        rows, cols = w.shape
        return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    params = json.loads(Path(job["params"]).read_text())
    heads = {"wq": params["n_heads"], "wk": params["n_kv_heads"]}
    src = torch.load(job["source"], map_location="cpu", mmap=True, weights_only=True)
    expected = {hf_name(k) for k in src}
    s = safe_open(job["surgery"], "pt")
    s_names = set(s.keys())
    res: dict = {"num_source_tensors": len(src), "num_surgery_tensors": len(s_names)}
    res["surgery_keys_are_the_source_renamed"] = s_names == expected
    for label, path in job["plain"].items():
        p = safe_open(path, "pt")
        p_names = set(p.keys())
        identical, differ = 0, []
        for name in sorted(s_names & p_names):
            a, b = s.get_tensor(name), p.get_tensor(name)
            if a.dtype == b.dtype and a.shape == b.shape and same_bytes(a, b):
                identical += 1
            else:
                differ.append(name)
        res[label] = {
            "keys_equal": s_names == p_names,
            "only_surgery": sorted(s_names - p_names),
            "only_plain": sorted(p_names - s_names),
            "identical": identical,
            "differ": differ,
        }
    from_source, source_bad = 0, []
    for meta, tensor in src.items():
        name = hf_name(meta)
        if name not in s_names:
            continue
        kind = meta.split(".")[-2]
        want = permute(tensor, heads[kind]) if kind in heads else tensor
        got = s.get_tensor(name)
        if got.dtype == want.dtype and got.shape == want.shape and same_bytes(got, want):
            from_source += 1
        else:
            source_bad.append(name)
    res.update(equal_to_source=from_source, differ_from_source=source_bad)
    res["ok"] = (
        res["surgery_keys_are_the_source_renamed"]
        and not source_bad
        and all(res[label]["keys_equal"] and not res[label]["differ"] for label in job["plain"])
    )
    return res


# --------------------------------------------------------------------------- the rows


def commands(folder: Path, rules: Path | None) -> list[dict]:
    py = sys.executable
    src, params, target = folder / SOURCE, folder / PARAMS, TARGET.format(folder=folder / HF_DIR)
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

    out_s = folder / "surgery.safetensors"
    flag, value = ("--map", rules) if rules else ("--preset", PRESET)
    add(
        f"surgery port --to hf:LlamaForCausalLM?config=DIR {flag} {rules.name if rules else PRESET}",
        "surgery",
        [py, "-m", "surgery", "port", src, "--to", target, flag, value, "-o", out_s],
        out_s,
    )
    for mmap in ("no-mmap", "mmap"):
        out_p = folder / f"plain_{mmap}.safetensors"
        add(
            f"torch.load(mmap={mmap == 'mmap'}) + rename + permute wq/wk + save_file",
            "plain" if mmap == "no-mmap" else "plain-mmap",
            [py, "-c", PLAIN, src, params, out_p, mmap],
            out_p,
        )
    add(
        "build_target(hf:LlamaForCausalLM?config=DIR, meta=True) [surgery's target: described]",
        "target",
        [py, "-c", TARGET_ALONE, target, "meta"],
        note="as port builds it: import torch + transformers, the model on the meta device, nothing read",
    )
    add(
        "build_target(hf:LlamaForCausalLM?config=DIR) [the target built for real]",
        "target-real",
        [py, "-c", TARGET_ALONE, target, "real"],
        note="the randomly initialised model in memory: what a port that loads into the model would hold",
    )
    add(
        "python -c 'import torch, transformers; LlamaForCausalLM' [the target's import floor]",
        "import-transformers",
        [py, "-c", "import torch, transformers; from transformers import LlamaForCausalLM"],
    )
    add("python -c 'import torch' [import floor]", "import-torch", [py, "-c", "import torch"])
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
    return arg if "\n" not in arg else arg.splitlines()[0] + " ... (the script is in bench_rules.py)"


def shipped_preset() -> Path:
    """The preset file as the package ships it (what `--preset` reads), found from surgery.__file__."""
    import surgery

    path = Path(surgery.__file__).parent / "presets" / f"{PRESET}.toml"
    if not path.is_file():
        raise SystemExit(f"error: {path}: this checkout ships no preset {PRESET}; pass --rules PATH.toml")
    return path


def config_flags(args: argparse.Namespace) -> list[str]:
    return [
        f"--dim={args.dim}",
        f"--layers={args.layers}",
        f"--heads={args.heads}",
        f"--kv-heads={args.kv_heads}",
        f"--ffn={args.ffn}",
        f"--vocab={args.vocab}",
    ]


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {args[0]} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def breakdown(rows: list[dict]) -> dict:
    """surgery's peak RSS and time beside their parts: the imports an hf target needs, the
    target as port builds it (described), and what the port adds on top of that."""
    done = {r["kind"]: r for r in rows if not r.get("failed")}
    kinds = ("surgery", "plain", "target", "target-real", "import-torch", "import-transformers")
    if not all(k in done for k in kinds):
        return {}
    mib = {k: _mib(done[k]["max_rss_kib"]) for k in kinds}
    wall = {k: done[k]["median_s"] for k in kinds}
    return {
        "peak_mib": mib,
        "median_wall_s": wall,
        "port_above_described_target_mib": mib["surgery"] - mib["target"],
        "imports_share_of_surgery_peak": mib["import-transformers"] / mib["surgery"],
        "imports_over_plain_peak": mib["import-transformers"] / mib["plain"],
        "imports_over_plain_time": wall["import-transformers"] / wall["plain"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4, help="grouped-query: fewer than --heads")
    parser.add_argument("--ffn", type=int, default=2816, help="FFN hidden size (Meta's rule for dim 1024)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--rules", type=Path, help=f"a rule file to use instead of the shipped preset {PRESET} (copied)"
    )
    parser.add_argument(
        "--env-as-is",
        action="store_true",
        help="run the commands in this environment exactly (by default they get a bytecode cache)",
    )
    parser.add_argument("--_generate", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--_check", metavar="JOB", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = {
        "dim": args.dim,
        "n_layers": args.layers,
        "n_heads": args.heads,
        "n_kv_heads": args.kv_heads,
        "ffn_dim": args.ffn,
        "vocab_size": args.vocab,
        "norm_eps": 1e-5,
    }

    if args._generate:
        print(json.dumps(generate(Path(args._generate), config)))
        return 0
    if args._check:
        print(json.dumps(check(json.loads(Path(args._check).read_text()))))
        return 0

    rules_text = (args.rules or shipped_preset()).read_bytes()
    folder = Path(tempfile.mkdtemp(prefix="bench_rules_"))
    try:
        rules = None
        if args.rules is not None:
            rules = folder / "rules.toml"
            shutil.copyfile(args.rules, rules)
        print(f"making the Meta-layout Llama checkpoint in {folder} ...", flush=True)
        facts = _child(["--_generate", str(folder), *config_flags(args)])
        print(
            f"  {facts['num_tensors']} tensors, {facts['parameters'] / 1e6:.1f} M parameters, "
            f"{facts['tensor_bytes'] / 1e9:.3f} GB float32; meta.pth {facts['source_bytes'] / 2**20:.0f} MiB "
            f"(made in {facts['seconds_make']} s)",
            flush=True,
        )
        env, bytecode = child_env(folder, args.env_as_is)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # this checkout
        print(f"  bytecode cache for the commands: {bytecode}", flush=True)
        rows = commands(folder, rules)
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
        split = breakdown(rows)

        print("checking the outputs tensor by tensor ...", flush=True)
        job = folder / "check.json"
        plain_outs = {r["kind"]: r["outputs"][0] for r in rows if r["kind"].startswith("plain")}
        job.write_text(
            json.dumps(
                {
                    "source": str(folder / SOURCE),
                    "params": str(folder / PARAMS),
                    "surgery": surgery["outputs"][0],
                    "plain": plain_outs,
                }
            )
        )
        checked = _child(["--_check", str(job)])
        if not checked["ok"]:
            problems.append(f"check: {checked}")

        mach = machine(folder, facts)
        mach["transformers"] = facts["transformers_version"]
        print()
        print(
            f"{mach['nproc']} CPUs ({mach['cpu']}), {mach['mem_gib']} GiB, {mach['tmp_filesystem']} temp folder; "
            f"Python {mach['python']}, torch {mach['torch']}, transformers {mach['transformers']}, "
            f"safetensors {mach['safetensors']}. Median of {RUNS} runs after 1 warm-up; input warm in the "
            "page cache; outputs deleted and sync() before every run."
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
        if split:
            mib, wall = split["peak_mib"], split["median_wall_s"]
            print(
                f"- surgery's peak {mib['surgery']:.0f} MiB: importing torch + transformers "
                f"(LlamaForCausalLM) alone peaks at {mib['import-transformers']:.0f} MiB "
                f"({100 * split['imports_share_of_surgery_peak']:.0f}% of it; torch alone "
                f"{mib['import-torch']:.0f} MiB), the target as port builds it (meta device) at "
                f"{mib['target']:.0f} MiB; the port adds {split['port_above_described_target_mib']:.0f} MiB "
                f"on top of that. Built for real, the target alone peaks at {mib['target-real']:.0f} MiB."
            )
            print(
                f"- those imports alone are {split['imports_over_plain_peak']:.2f} of the plain way's peak and "
                f"{split['imports_over_plain_time']:.2f} of its time ({wall['import-transformers']:.2f} s of "
                f"surgery's {wall['surgery']:.2f} s; the plain way's whole run {wall['plain']:.2f} s): no port "
                "that imports transformers does better than these ratios."
            )
        for label, c in ((k, checked[k]) for k in plain_outs):
            print(
                f"- check surgery vs {label}: {c['identical']}/{checked['num_surgery_tensors']} tensors "
                f"bit-identical, keys equal: {c['keys_equal']}"
            )
        print(
            f"- check surgery vs the source: {checked['equal_to_source']}/{checked['num_source_tensors']} tensors "
            f"equal to the source renamed (q_proj, k_proj: permuted), keys are the source's renamed: "
            f"{checked['surgery_keys_are_the_source_renamed']}"
        )
        for p in problems:
            print(f"- PROBLEM: {p}")

        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "benchmark": "rules",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": mach,
            "code": {"before": code_before, "after": code_after},
            "cpu_during_runs": load,
            "params": {
                "config": config,
                "rules": str(args.rules) if args.rules else f"preset {PRESET}",
                "rules_sha256": hashlib.sha256(rules_text).hexdigest(),
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
            "surgery_peak_breakdown": split,
            "check": checked,
            "problems": problems,
            "table_markdown": table(rows),
        }
        return write_results(RESULTS, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
