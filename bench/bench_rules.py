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
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))  # the checker and the preset lookup read this checkout's surgery

import _harness as harness  # noqa: E402

RESULTS = HERE / "results" / "rules.json"
PRESET = "llama-meta-to-hf"
TIME_TARGET = 1.0  # surgery/plain wall time at most this ("no slower")
MEMORY_TARGET = 0.5  # surgery/plain peak RSS at most this ("under half the memory")

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
    out_s = folder / "surgery.safetensors"
    flag, value = ("--map", rules) if rules else ("--preset", PRESET)
    rows = [
        harness.row(
            f"surgery port --to hf:LlamaForCausalLM?config=DIR {flag} {rules.name if rules else PRESET}",
            "surgery",
            [py, "-m", "surgery", "port", src, "--to", target, flag, value, "-o", out_s],
            out_s,
        )
    ]
    for mmap in ("no-mmap", "mmap"):
        out_p = folder / f"plain_{mmap}.safetensors"
        rows.append(
            harness.row(
                f"torch.load(mmap={mmap == 'mmap'}) + rename + permute wq/wk + save_file",
                "plain" if mmap == "no-mmap" else "plain-mmap",
                [py, "-c", PLAIN, src, params, out_p, mmap],
                out_p,
            )
        )
    return rows + [
        harness.row(
            "build_target(hf:LlamaForCausalLM?config=DIR, meta=True) [surgery's target: described]",
            "target",
            [py, "-c", TARGET_ALONE, target, "meta"],
            note="as port builds it: import torch + transformers, the model on the meta device, nothing read",
        ),
        harness.row(
            "build_target(hf:LlamaForCausalLM?config=DIR) [the target built for real]",
            "target-real",
            [py, "-c", TARGET_ALONE, target, "real"],
            note="the randomly initialised model in memory: what a port that loads into the model would hold",
        ),
        harness.row(
            "python -c 'import torch, transformers; LlamaForCausalLM' [the target's import floor]",
            "import-transformers",
            [py, "-c", "import torch, transformers; from transformers import LlamaForCausalLM"],
        ),
        harness.row("python -c 'import torch' [import floor]", "import-torch", [py, "-c", "import torch"]),
        *harness.measurement_floor(),
    ]


# --------------------------------------------------------------------------- reporting


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


def breakdown(rows: list[dict]) -> dict:
    """surgery's peak RSS and time beside their parts: the imports an hf target needs, the
    target as port builds it (described), and what the port adds on top of that."""
    done = {r["kind"]: r for r in rows if not r.get("failed")}
    kinds = ("surgery", "plain", "target", "target-real", "import-torch", "import-transformers")
    if not all(k in done for k in kinds):
        return {}
    mib = {k: harness.mib(done[k]["max_rss_kib"]) for k in kinds}
    wall = {k: done[k]["median_s"] for k in kinds}
    return {
        "peak_mib": mib,
        "median_wall_s": wall,
        "port_above_described_target_mib": mib["surgery"] - mib["target"],
        "imports_share_of_surgery_peak": mib["import-transformers"] / mib["surgery"],
        "imports_over_plain_peak": mib["import-transformers"] / mib["plain"],
        "imports_over_plain_time": wall["import-transformers"] / wall["plain"],
    }


# --------------------------------------------------------------------------- the run


def main() -> int:
    parser = harness.benchmark_parser(__doc__, "generate", "check")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4, help="grouped-query: fewer than --heads")
    parser.add_argument("--ffn", type=int, default=2816, help="FFN hidden size (Meta's rule for dim 1024)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--rules", type=Path, help=f"a rule file to use instead of the shipped preset {PRESET} (copied)"
    )
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
        return harness.reply(generate(Path(args._generate), config))
    if args._check:
        return harness.reply(check(json.loads(Path(args._check).read_text())))

    rules_text = (args.rules or shipped_preset()).read_bytes()
    with tempfile.TemporaryDirectory(prefix="bench_rules_", ignore_cleanup_errors=True) as tmp:
        folder = Path(tmp)
        rules = None
        if args.rules is not None:
            rules = folder / "rules.toml"
            shutil.copyfile(args.rules, rules)
        print(f"making the Meta-layout Llama checkpoint in {folder} ...", flush=True)
        facts = harness.child(__file__, ["--_generate", str(folder), *config_flags(args)])
        print(
            f"  {facts['num_tensors']} tensors, {facts['parameters'] / 1e6:.1f} M parameters, "
            f"{facts['tensor_bytes'] / 1e9:.3f} GB float32; meta.pth {facts['source_bytes'] / 2**20:.0f} MiB "
            f"(made in {facts['seconds_make']} s)",
            flush=True,
        )
        env, bytecode = harness.child_env(folder, args.env_as_is, this_checkout=True)
        print(f"  bytecode cache for the commands: {bytecode}", flush=True)
        rows = commands(folder, rules)
        watch = harness.Watch()
        clear_refs_ok = harness.run_all(rows, folder, env, sync=True)
        watch.stop()

        problems = harness.summarize(rows, count_warmup=True)
        by_kind = {r["kind"]: r for r in rows}
        aims = harness.against_plains(by_kind, ("plain", "plain-mmap"), TIME_TARGET, MEMORY_TARGET)
        split = breakdown(rows)

        print("checking the outputs tensor by tensor ...", flush=True)
        plain_outs = {kind: by_kind[kind]["outputs"][0] for kind in ("plain", "plain-mmap")}
        job = {
            "source": str(folder / SOURCE),
            "params": str(folder / PARAMS),
            "surgery": by_kind["surgery"]["outputs"][0],
            "plain": plain_outs,
        }
        checked = harness.check_in_child(__file__, folder, job)
        if not checked["ok"]:
            problems.append(f"check: {checked}")

        mach = harness.machine(folder, facts)
        mach["transformers"] = facts["transformers_version"]
        harness.print_context(
            mach, bytecode, watch, also={"transformers": mach["transformers"]}, warm="input"
        )
        problems += watch.problems()
        print()
        print(harness.ratio_table(rows))
        print()
        harness.print_ratio_note("mmap=False")
        harness.print_clear_refs_warning(clear_refs_ok)
        harness.print_spread(rows)
        harness.print_aims(aims, TIME_TARGET, MEMORY_TARGET)
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
        for label in plain_outs:
            c = checked[label]
            print(
                f"- check surgery vs {label}: {c['identical']}/{checked['num_surgery_tensors']} tensors "
                f"bit-identical, keys equal: {c['keys_equal']}"
            )
        print(
            f"- check surgery vs the source: {checked['equal_to_source']}/{checked['num_source_tensors']} tensors "
            f"equal to the source renamed (q_proj, k_proj: permuted), keys are the source's renamed: "
            f"{checked['surgery_keys_are_the_source_renamed']}"
        )

        return harness.finish(
            RESULTS,
            {
                **harness.results_head("rules", mach, watch),
                "params": {
                    "config": config,
                    "rules": str(args.rules) if args.rules else f"preset {PRESET}",
                    "rules_sha256": hashlib.sha256(rules_text).hexdigest(),
                    **harness.measuring_params(args.env_as_is, bytecode),
                },
                "inputs": facts,
                **harness.measuring_method(clear_refs_ok),
                **harness.ratio_fields(rows, folder, aims, TIME_TARGET, MEMORY_TARGET),
                "surgery_peak_breakdown": split,
                "check": checked,
                "problems": problems,
                "table_markdown": harness.ratio_table(rows),
            },
        )


if __name__ == "__main__":
    sys.exit(main())
