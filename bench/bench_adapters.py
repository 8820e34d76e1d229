"""Benchmark `surgery merge BASE --adapter DIR` against the plain way: PEFT's `merge_and_unload`.

What it measures
    Wall time and peak RSS of separate child processes that merge a PEFT LoRA
    adapter into its base model and write the merged model. The inputs are made
    by a child process: a Llama (``transformers.LlamaConfig``: ``--layers`` (12)
    decoder layers, vocabulary 32000, heads of 64, intermediate size 2.75 x the
    hidden size as TinyLlama's, the hidden size a multiple of 64 chosen to come
    closest to ``--size-mb`` MiB of float32, default 1024), built on the meta
    device, every parameter filled with ``torch.manual_seed(0)`` normal values
    (std 0.02), saved by ``model.save_pretrained("base")`` (``config.json``,
    ``model.safetensors``); then ``get_peft_model(model, LoraConfig(r=16,
    lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj"]))`` after ``torch.manual_seed(1)``, every
    B matrix filled with normal values (std 0.02; PEFT starts them at zero),
    saved by ``save_pretrained("adapter")``.

    Rows:

    * surgery::

          python -m surgery merge base/model.safetensors --adapter adapter -o surgery.safetensors

    * the plain way, as PEFT's documentation merges an adapter::

          model = AutoModelForCausalLM.from_pretrained("base")
          merged = PeftModel.from_pretrained(model, "adapter").merge_and_unload()
          merged.save_pretrained("plain")

    * the floors: ``python -c 'import torch'`` (surgery's),
      ``python -c 'import torch, peft; from transformers import LlamaForCausalLM'``
      (the plain way's) and ``true`` (the measurement floor).

    Measured with ``_harness.py`` as bench_merge.py: one warm-up then 3 timed runs
    round-robin, each command in its own child; outputs deleted and ``sync()``
    before each run, outside the timing; inputs warm in the page cache. After the
    runs a checker child compares surgery's output with the plain output tensor by
    tensor (same keys, dtypes, shapes; bit-identical, else the largest absolute
    difference and that over the tensor's largest magnitude) and with the base
    (exactly the adapted tensors changed). A failed command, a relative difference
    above 1e-6 (PEFT adds a float32 B A, surgery a float64 one, both rounded once
    to float32), other processes using more than 5% of a CPU or surgery's code
    changing mid-run is a PROBLEM (exit code 1).

The aim (issue 14, "Memory and speed")
    surgery no slower than the plain way (time ratio <= 1.0) and under a quarter of
    its peak memory (memory ratio <= 0.25).

How to run
    python bench/bench_adapters.py                                # ~1 GiB Llama, a few minutes
    python bench/bench_adapters.py --size-mb 64                   # quick check

    It prints a Markdown table and writes the same numbers to bench/results/adapters.json.
    Inputs and outputs go to a fresh temporary folder (about 3 x --size-mb) removed at the end.
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

RESULTS = HERE / "results" / "adapters.json"
TIME_TARGET = 1.0  # surgery/plain wall time at most this ("no slower")
MEMORY_TARGET = 0.25  # surgery/plain peak RSS at most this ("peak memory under a quarter")
RELATIVE_LIMIT = 1e-6  # max |surgery - PEFT| over the tensor's largest magnitude, before a PROBLEM

VOCAB = 32000
HEAD_DIM = 64
LORA = {
    "r": 16,
    "lora_alpha": 32,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


# --------------------------------------------------------------------------- inputs
# Child process (`--_generate`): this process never holds torch or the tensors.


def llama_shape(layers: int, target_bytes: int) -> dict:
    """LlamaConfig sizes: `layers` decoder layers, hidden size (a multiple of 64) closest to target bytes."""

    def sizes(hidden: int) -> dict:
        return {
            "hidden_size": hidden,
            "intermediate_size": HEAD_DIM * round(2.75 * hidden / HEAD_DIM),
            "num_attention_heads": hidden // HEAD_DIM,
            "num_key_value_heads": hidden // HEAD_DIM,
            "num_hidden_layers": layers,
            "vocab_size": VOCAB,
        }

    def nbytes(s: dict) -> int:
        h, i = s["hidden_size"], s["intermediate_size"]
        per_layer = 4 * h * h + 3 * h * i + 2 * h  # attention, MLP, two norms
        return 4 * (2 * VOCAB * h + h + layers * per_layer)  # embeddings, lm_head, final norm

    return min((sizes(HEAD_DIM * k) for k in range(1, 257)), key=lambda s: abs(nbytes(s) - target_bytes))


def generate(folder: Path, size_mb: float, layers: int) -> dict:
    import peft
    import safetensors
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    shape = llama_shape(layers, int(size_mb * 2**20))
    config = transformers.LlamaConfig(**shape, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.to_empty(device="cpu")  # no init of the weights: filled below, seeded
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(folder / "base")
    params = [(name, p.shape) for name, p in model.named_parameters()]

    torch.manual_seed(1)
    lora = get_peft_model(model, LoraConfig(**LORA))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: the merge would change nothing
                p.normal_(0.0, 0.02)
    lora.save_pretrained(folder / "adapter")
    adapted = [name for name, _ in params if any(f".{m}." in name for m in LORA["target_modules"])]
    return {
        "torch_version": torch.__version__,
        "safetensors_version": safetensors.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
        "config": shape,
        "lora": LORA,
        "num_tensors": len(params),
        "adapted_tensors": len(adapted),
        "parameters": sum(math.prod(s) for _, s in params),
        "base_bytes": (folder / "base" / "model.safetensors").stat().st_size,
        "adapter_bytes": (folder / "adapter" / "adapter_model.safetensors").stat().st_size,
        "largest_tensor_bytes": 4 * max(math.prod(s) for _, s in params),
        "largest_adapted_tensor_bytes": 4 * max(math.prod(s) for n, s in params if n in adapted),
        "dtype": "float32",
        "seconds_make": round(time.perf_counter() - t0, 2),
    }


# --------------------------------------------------------------------------- the plain way

PLAIN = """\
import sys
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(base)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out)
"""

# --------------------------------------------------------------------------- checking
# Child process (`--_check`): the files memory-mapped, one tensor at a time.


def check(job: dict) -> dict:
    """surgery's output against PEFT's (keys, dtypes, shapes, how far apart) and against the base."""
    import torch
    from safetensors import safe_open

    def tensors(paths: list[Path]) -> dict:  # name -> open file (a folder's shards all together)
        found: dict = {}
        for path in paths:
            f = safe_open(path, "pt")
            found.update(dict.fromkeys(f.keys(), f))
        return found

    s = tensors([Path(job["surgery"])])
    p = tensors(sorted(Path(job["plain"]).glob("*.safetensors")))
    b = tensors([Path(job["base"])])
    names = sorted(s.keys() & p.keys())
    identical, differ, mismatched, changed = 0, [], [], []
    max_abs, max_rel = 0.0, 0.0
    for name in names:
        a, c = s[name].get_tensor(name), p[name].get_tensor(name)
        if a.dtype != c.dtype or a.shape != c.shape:
            mismatched.append(name)
            continue
        if name in b and not torch.equal(a, b[name].get_tensor(name)):
            changed.append(name)
        if torch.equal(a, c):
            identical += 1
            continue
        differ.append(name)
        diff = (a.double() - c.double()).abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(c.double().abs().max().item(), torch.finfo(c.dtype).tiny))
    adapted = sorted(n for n in b if any(f".{m}." in n for m in job["target_modules"]))
    keys_equal = s.keys() == p.keys()
    ok = keys_equal and not mismatched and max_rel <= RELATIVE_LIMIT and changed == adapted
    return {
        "num_surgery_tensors": len(s),
        "num_plain_tensors": len(p),
        "keys_equal": keys_equal,
        "only_surgery": sorted(s.keys() - p.keys()),
        "only_plain": sorted(p.keys() - s.keys()),
        "dtype_or_shape_differ": mismatched,
        "identical": identical,
        "differ": len(differ),
        "max_abs_difference": max_abs,
        "max_relative_difference": max_rel,
        "relative_limit": RELATIVE_LIMIT,
        "changed_from_base": len(changed),
        "adapted_in_base": len(adapted),
        "changed_are_adapted": changed == adapted,
        "ok": ok,
    }


# --------------------------------------------------------------------------- the rows


def commands(folder: Path) -> list[dict]:
    py = sys.executable
    base, adapter = folder / "base", folder / "adapter"
    out_s, out_p = folder / "surgery.safetensors", folder / "plain"
    plain_floor = "import torch, peft; from transformers import LlamaForCausalLM"
    return [
        harness.row(
            "surgery merge base/model.safetensors --adapter adapter -o out.safetensors",
            "surgery",
            [py, "-m", "surgery", "merge", base / "model.safetensors", "--adapter", adapter, "-o", out_s],
            out_s,
        ),
        harness.row(
            "from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained",
            "plain",
            [py, "-c", PLAIN, base, adapter, out_p],
            out_p,
        ),
        harness.row("python -c 'import torch' [surgery's import floor]", "floor", [py, "-c", "import torch"]),
        harness.row(
            f"python -c '{plain_floor}' [plain import floor]", "plain-floor", [py, "-c", plain_floor]
        ),
        *harness.measurement_floor(),
    ]


# --------------------------------------------------------------------------- the run


def main() -> int:
    parser = harness.benchmark_parser(__doc__, "generate", "check")
    parser.add_argument("--size-mb", type=float, default=1024, help="MiB of float32 weights in the base")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers of the Llama")
    args = parser.parse_args()
    if args.layers < 1:
        parser.error("--layers: at least 1")
    if args._generate:
        return harness.reply(generate(Path(args._generate), args.size_mb, args.layers))
    if args._check:
        return harness.reply(check(json.loads(Path(args._check).read_text())))

    with tempfile.TemporaryDirectory(prefix="bench_adapters_", ignore_cleanup_errors=True) as tmp:
        folder = Path(tmp)
        print(f"making the base and the adapter in {folder} ...", flush=True)
        facts = harness.child(
            __file__, ["--_generate", str(folder), f"--size-mb={args.size_mb}", f"--layers={args.layers}"]
        )
        cfg = facts["config"]
        print(
            f"  Llama: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, intermediate "
            f"{cfg['intermediate_size']}, vocabulary {cfg['vocab_size']}: {facts['num_tensors']} tensors, "
            f"{facts['base_bytes'] / 2**20:.1f} MiB float32 (largest tensor "
            f"{facts['largest_tensor_bytes'] / 2**20:.1f} MiB, largest adapted "
            f"{facts['largest_adapted_tensor_bytes'] / 2**20:.1f} MiB); adapter r {LORA['r']} on "
            f"{facts['adapted_tensors']} tensors, {facts['adapter_bytes'] / 2**20:.1f} MiB; made in "
            f"{facts['seconds_make']} s",
            flush=True,
        )
        env, bytecode = harness.child_env(folder, args.env_as_is, this_checkout=True)
        print(f"  bytecode cache for the commands: {bytecode}", flush=True)
        rows = commands(folder)
        watch = harness.Watch()
        clear_refs_ok = harness.run_all(rows, folder, env, sync=True)
        watch.stop()

        problems = harness.summarize(rows, count_warmup=True)
        by_kind = {r["kind"]: r for r in rows}
        surgery, plain = by_kind["surgery"], by_kind["plain"]
        aim = harness.against_plain(surgery, plain, TIME_TARGET, MEMORY_TARGET)
        if aim:  # above each way's own import floor: what the merge itself holds
            above_s = surgery["max_rss_kib"] - by_kind["floor"]["max_rss_kib"]
            above_p = plain["max_rss_kib"] - by_kind["plain-floor"]["max_rss_kib"]
            aim["surgery_above_import_floor_mib"] = round(harness.mib(above_s), 1)
            aim["plain_above_import_floor_mib"] = round(harness.mib(above_p), 1)

        print("checking the outputs tensor by tensor ...", flush=True)
        job = {
            "surgery": surgery["outputs"][0],
            "plain": plain["outputs"][0],
            "base": str(folder / "base" / "model.safetensors"),
            "target_modules": LORA["target_modules"],
        }
        checked = harness.check_in_child(__file__, folder, job)
        if not checked["ok"]:
            problems.append(f"check: {checked}")

        mach = harness.machine(folder, facts)
        versions = {"transformers": facts["transformers_version"], "peft": facts["peft_version"]}
        harness.print_context(mach, bytecode, watch, also=versions)
        problems += watch.problems()
        print()
        print(harness.ratio_table(rows))
        print()
        harness.print_ratio_note()
        harness.print_clear_refs_warning(clear_refs_ok)
        harness.print_spread(rows)
        if aim:
            harness.print_aims({"plain": aim}, TIME_TARGET, MEMORY_TARGET)
            print(
                f"- above its own import floor surgery peaks at {aim['surgery_above_import_floor_mib']} MiB, "
                f"the plain way at {aim['plain_above_import_floor_mib']} MiB"
            )
        print(
            f"- check surgery vs PEFT: {checked['identical']}/{checked['num_surgery_tensors']} tensors "
            f"bit-identical, keys equal: {checked['keys_equal']}"
            + (
                f"; the other {checked['differ']} differ by at most {checked['max_abs_difference']:.3g} "
                f"({checked['max_relative_difference']:.3g} of the tensor's largest magnitude; limit "
                f"{RELATIVE_LIMIT:g})"
                if checked["differ"]
                else ""
            )
            + f"; {checked['changed_from_base']} tensors changed from the base, the adapted ones: "
            f"{checked['changed_are_adapted']}"
        )

        return harness.finish(
            RESULTS,
            {
                **harness.results_head("adapters", mach, watch),
                "params": {
                    "size_mb": args.size_mb,
                    "layers": args.layers,
                    **harness.measuring_params(args.env_as_is, bytecode),
                },
                "inputs": facts,
                **harness.measuring_method(clear_refs_ok),
                **harness.ratio_fields(rows, folder, aim, TIME_TARGET, MEMORY_TARGET),
                "check": checked,
                "problems": problems,
                "table_markdown": harness.ratio_table(rows),
            },
        )


if __name__ == "__main__":
    sys.exit(main())
