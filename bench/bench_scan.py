"""Compare `surgery scan` with picklescan, modelscan and fickling on the project's hostile corpus.

What it measures
    Each scanner's verdict on every file of a corpus made here (in a child process: this
    process never imports torch), and each scanner's time over the whole corpus.

    * hostile: files whose pickle runs code when loaded the ordinary way, built by the
      same builders as the test suite (tests/test_hostile_pickle.py, tests/test_scan.py,
      tests/test_numpy_formats.py), where each payload is proven to run: 18 payload routes
      (GLOBAL/STACK_GLOBAL/INST/OBJ/NEWOBJ/EXT, memo tricks, dotted names, getattr chains,
      nested pickles, ...) as a plain pickle, in a torch zip beside real weights and in a
      legacy torch file; `__reduce__` payloads from `pickle.dumps` at protocols 0-5; zip
      tricks (a second data.pkl, a differently-cased one, a deflated one); a payload in
      the legacy magic-number pickle, before a broken pickle, in an `.npy`/`.npz` object
      array, in a PyTorch 0.3 tar (its object pickle and its tensor records).
    * benign: checkpoints `torch.load(weights_only=True)` reads: torchvision models saved
      by `torch.save` (zip and legacy), the PyTorch ImageNet example's training
      checkpoint, a Lightning-style `.ckpt`, safetensors files.
    * harmless but outside the allowlist (reported, not scored): a pickled whole
      `nn.Module`, numpy scalars and an `argparse.Namespace` beside the weights, a
      detectron2-style `.pkl` of numpy arrays. Scanners differ on purpose here.

How each tool is asked (one process per file, exit code or JSON read back)
    * surgery: `surgery scan FILE --json`; caught = danger or unsafe, error = corrupt or
      unreadable, clean = safe.
    * picklescan: `picklescan -p FILE`; exit 1 caught, 2 error, 0 clean.
    * modelscan: `modelscan -p FILE`; exit 1 caught, 2 error, 3 "no supported files"
      (counted as not scanned), 0 clean.
    * fickling: its CLI reads no zip archive, so its Python API as documented:
      `fickling.scan_zip_archive` for zips, else `fickling.scan_file` (graceful); caught
      when a pickle is not LIKELY_SAFE (its own verdict), error when it raises. A second
      row counts only LIKELY_OVERTLY_MALICIOUS and worse: fickling rates every global
      outside the standard library, torch's own rebuild functions included, as likely unsafe.

    A hostile file is caught, missed (said clean), or an error (the tool could not read
    it: a CI gate on the exit code would still block it, but nothing was found). A benign
    file flagged or in error is a false alarm.

    Time: each tool over the whole corpus folder in one process (fickling: one Python
    process looping over the files with its API), one warm-up then 3 timed runs
    round-robin through bench/_harness.py: median wall time and peak RSS.

How to run
    pip install picklescan modelscan fickling   # for the measurement only
    python bench/bench_scan.py                  # about 3 minutes

    It prints a Markdown table and writes bench/results/scan.json. A tool that is not
    installed is reported as such.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import _harness as harness  # noqa: E402

RESULTS = HERE / "results" / "scan.json"
TOOLS = ("surgery", "picklescan", "modelscan", "fickling", "fickling-malicious")
# fickling's own verdict flags any global outside the standard library (torch's rebuild
# functions too); "fickling-malicious" counts only what it rates likely overtly malicious.
FICKLING_THRESHOLDS = {"fickling": "POSSIBLY_UNSAFE", "fickling-malicious": "LIKELY_OVERTLY_MALICIOUS"}
GROUPS = ("hostile", "benign", "harmless")
FICKLING = r"""
import sys, zipfile, fickling
from fickling.analysis import Severity
threshold = Severity[sys.argv[1]].value[0]  # a pickle at or above this severity is caught
failed = 0
for path in sys.argv[2:]:
    try:
        if zipfile.is_zipfile(path):
            results = fickling.scan_zip_archive(path, graceful=True).values()
        else:
            results = [fickling.scan_file(path, graceful=True)]
        failed |= 1 if any(r.severity.value[0] >= threshold for r in results) else 0
    except Exception as exc:
        print(f"{path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        failed |= 2
sys.exit(2 if failed & 2 and len(sys.argv) == 3 else failed & 1)
"""


# --------------------------------------------------------------------------- the corpus
# Made in a child process (`--_make DIR`): torch, numpy and the test builders stay out of
# this process, whose RSS would leak into the measured children's.


def make_corpus(folder: Path) -> list[dict]:
    """Write every file; return [{path, group, what}]."""
    sys.path.insert(0, str(ROOT / "tests"))
    import io
    import pickle
    import zipfile
    from collections import OrderedDict

    import numpy as np
    import test_hostile_pickle as hp
    import torch
    import torchvision
    from conftest import torch_save_bytes, write_torch_zip
    from safetensors.torch import save_file
    from test_scan import torch03_tar

    files: list[dict] = []
    marker = folder / "MARKER-never-created"

    def add(group: str, name: str, data: bytes | None, what: str) -> Path:
        path = folder / group / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        files.append({"path": str(path), "group": group, "what": what})
        return path

    for name, payload in hp.PAYLOADS.items():
        add("hostile", f"{name}.pkl", hp.standalone(payload, marker), f"{name}, plain pickle")
        data_pkl = hp.beside_weights(payload, marker, hp.STATE_PKL)
        path = add("hostile", f"{name}.zip.pth", None, f"{name}, torch zip beside weights")
        write_torch_zip(path, data_pkl, hp.STATE_STORAGES)
        path = add("hostile", f"{name}.legacy.pth", None, f"{name}, legacy torch file beside weights")
        hp.write_legacy(path, hp.beside_weights(payload, marker, hp.LEGACY[3]))
    for reducer, (make, _) in hp.REDUCERS.items():
        for protocol in range(6):
            data = pickle.dumps(make(marker), protocol=protocol)
            add(
                "hostile",
                f"reduce_{reducer}_p{protocol}.pkl",
                data,
                f"__reduce__ {reducer}, protocol {protocol}",
            )
    hook = hp.RunsCommand(f"touch {marker}")
    add(
        "hostile",
        "reduce_torch_save.pth",
        torch_save_bytes({"hook": hook, "w": hp.STATE}),
        "torch.save with a __reduce__ payload",
    )
    legacy = torch_save_bytes({"hook": hook, "w": hp.STATE}, _use_new_zipfile_serialization=False)
    add("hostile", "reduce_torch_save_legacy.pth", legacy, "legacy torch.save with a __reduce__ payload")
    payload_pkl = hp.beside_weights(hp.PAYLOADS["global_reduce"], marker, hp.STATE_PKL)
    path = add("hostile", "zip_second_data_pkl.pth", None, "zip: a second data.pkl holding the payload")
    with zipfile.ZipFile(path, "w") as zf, warnings_off():
        zf.writestr("archive/data.pkl", hp.STATE_PKL)
        zf.writestr("archive/data.pkl", payload_pkl)
        for key, blob in hp.STATE_STORAGES.items():
            zf.writestr(f"archive/data/{key}", blob)
        zf.writestr("archive/version", "3\n")
    path = add("hostile", "zip_upper_case_data_pkl.pth", None, "zip: the payload in ARCHIVE/DATA.PKL")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ARCHIVE/DATA.PKL", payload_pkl)
        for key, blob in hp.STATE_STORAGES.items():
            zf.writestr(f"ARCHIVE/data/{key}", blob)
    path = add("hostile", "zip_deflated_data_pkl.pth", None, "zip: the payload in a deflated data.pkl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", payload_pkl)
        for key, blob in hp.STATE_STORAGES.items():
            zf.writestr(f"archive/data/{key}", blob)
    magic = hp.LEGACY_MAGIC_PICKLE[:-1] + hp.PAYLOADS["global_reduce"].build(marker) + b"0."
    path = add(
        "hostile", "legacy_payload_in_magic.pth", None, "legacy: the payload in the magic-number pickle"
    )
    hp.write_legacy(path, hp.LEGACY[3], magic=magic)
    broken = b"\x80\x02}" + hp.u("hook") + hp.PAYLOADS["global_reduce"].build(marker) + b"s\xff"
    add("hostile", "payload_then_broken.pkl", broken, "a payload, then an unknown opcode")
    buf = io.BytesIO()
    np.save(buf, np.array([hook], dtype=object), allow_pickle=True)
    add("hostile", "object_array.npy", buf.getvalue(), "npy object array whose pickle runs a command")
    buf = io.BytesIO()
    np.savez_compressed(buf, w=np.ones(3, np.float32), hook=np.array([hook], dtype=object))
    add(
        "hostile",
        "object_member.npz",
        buf.getvalue(),
        "npz with an object member whose pickle runs a command",
    )
    state = OrderedDict(w=torch.arange(6.0).view(2, 3))
    path = add("hostile", "torch03_payload.pth", None, "PyTorch 0.3 tar: payload in its object pickle")
    torch03_tar(path, {"state_dict": state, "hook": hook}, state)
    path = add(
        "hostile", "torch03_tensor_records.pth", None, "PyTorch 0.3 tar: payload in its tensor records"
    )
    torch03_tar(
        path, {"state_dict": state}, state, tensor_type_payload=b"cposix\nsystem\n" + hp.u("true") + b"\x85R"
    )

    torch.manual_seed(0)
    for arch in ("resnet18", "mobilenet_v3_small", "squeezenet1_0"):
        model = getattr(torchvision.models, arch)(weights=None)
        torch.save(model.state_dict(), add("benign", f"{arch}.pth", None, f"torchvision {arch} state_dict"))
        save_file(model.state_dict(), str(add("benign", f"{arch}.safetensors", None, f"{arch} safetensors")))
    model = torchvision.models.resnet18(weights=None)
    path = add("benign", "resnet18_legacy.pth", None, "resnet18 state_dict, legacy format")
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    imagenet = {
        "epoch": 90,
        "arch": "resnet18",
        "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
        "best_acc1": torch.tensor(76.13),
        "optimizer": optimizer.state_dict(),
    }
    torch.save(
        imagenet, add("benign", "checkpoint.pth.tar", None, "the PyTorch ImageNet example's checkpoint")
    )
    lightning = {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {"model." + k: v for k, v in model.state_dict().items()},
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.25)}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [{"step_size": 30, "gamma": 0.1, "last_epoch": 3}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1, "arch": "resnet18"},
    }
    torch.save(lightning, add("benign", "lightning.ckpt", None, "a Lightning-style checkpoint"))

    import argparse as argparse_module

    small = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    torch.save(small, add("harmless", "whole_module.pth", None, "torch.save(model): a pickled nn.Module"))
    extras = {
        "state_dict": small.state_dict(),
        "best": np.float64(0.9),
        "args": argparse_module.Namespace(lr=0.1),
    }
    torch.save(
        extras,
        add(
            "harmless",
            "numpy_and_namespace.pth",
            None,
            "numpy scalar and argparse.Namespace beside the weights",
        ),
    )
    d2 = {
        "model": {k: v.numpy() for k, v in small.state_dict().items()},
        "__author__": "Detectron2 Model Zoo",
    }
    add("harmless", "model_final.pkl", pickle.dumps(d2, protocol=4), "detectron2-style .pkl of numpy arrays")
    assert not marker.exists()
    return files


class warnings_off:
    """zipfile warns about the duplicate member it is asked to write: that is the point."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


# --------------------------------------------------------------------------- asking the tools


def installed(tool: str) -> str | None:
    """The tool's version, or None when it is not installed."""
    if tool == "surgery":
        return "this checkout"
    tool = tool.split("-")[0]
    try:
        from importlib.metadata import version

        return version(tool)
    except Exception:
        return None


def argv(tool: str, paths: list[str]) -> list[str]:
    """The command asking `tool` about `paths` (one file or the corpus folder; fickling: files)."""
    if tool == "surgery":
        return [sys.executable, "-m", "surgery", "scan", *paths, "--json"]
    if tool in FICKLING_THRESHOLDS:
        return [sys.executable, "-c", FICKLING, FICKLING_THRESHOLDS[tool], *paths]
    return [shutil.which(tool) or tool, "-p", paths[0]]


def verdict(tool: str, path: str, env: dict[str, str]) -> str:
    """caught | clean | error | not scanned, for one file."""
    proc = subprocess.run(argv(tool, [path]), capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if tool == "surgery":
        try:
            found = [c["verdict"] for c in json.loads(proc.stdout)["checkpoints"]]
        except (ValueError, KeyError):
            return "error"
        if not found:
            return "not scanned"
        if any(v in ("danger", "unsafe") for v in found):
            return "caught"
        return "error" if any(v in ("corrupt", "error") for v in found) else "clean"
    codes = {0: "clean", 1: "caught"} | ({3: "not scanned"} if tool == "modelscan" else {})
    return codes.get(proc.returncode, "error")


def main() -> int:
    parser = harness.benchmark_parser(__doc__, "make")
    args = parser.parse_args()
    if args._make:
        return harness.reply(make_corpus(Path(args._make)))

    with tempfile.TemporaryDirectory(prefix="surgery-bench-scan-", ignore_cleanup_errors=True) as tmp:
        folder = Path(tmp)
        env, bytecode = harness.child_env(folder, args.env_as_is, this_checkout=True)
        corpus = folder / "corpus"
        corpus.mkdir()
        print("making the corpus ...", file=sys.stderr, flush=True)
        files = harness.child(__file__, ["--_make", str(corpus)], env=env)
        versions = {tool: installed(tool) for tool in TOOLS}
        tools = [t for t in TOOLS if versions[t]]
        print(f"{len(files)} files; asking {', '.join(tools)} about each ...", file=sys.stderr, flush=True)
        for entry in files:
            entry["verdicts"] = {tool: verdict(tool, entry["path"], env) for tool in tools}
            entry["path"] = os.path.relpath(entry["path"], corpus)
        rows = []
        for tool in tools:
            paths = [str(corpus / f["path"]) for f in files] if tool in FICKLING_THRESHOLDS else [str(corpus)]
            rows.append({"case": tool, "command": tool, "argv": argv(tool, paths)})
        harness.run_all(rows, folder, env)
        harness.summarize(rows, count_warmup=False)  # exit codes are verdicts here, not failures
        table = _table(files, rows, versions)
        print(table)
        doc = {
            "files": files,
            "timing": [{k: r[k] for k in ("case", "argv", "median_s", "max_rss_kib", "runs")} for r in rows],
            "versions": versions,
            "bytecode": bytecode,
            "code": harness.code_state(),
            "table": table,
            "problems": [],
        }
        return harness.finish(RESULTS, doc)


def _table(files: list[dict], rows: list[dict], versions: dict[str, str | None]) -> str:
    counts = {g: sum(f["group"] == g for f in files) for g in GROUPS}
    head = [
        "tool",
        f"hostile caught (of {counts['hostile']})",
        "missed",
        "could not read",
        f"benign false alarms (of {counts['benign']})",
        f"harmless flagged (of {counts['harmless']})",
        "whole corpus s",
        "peak RSS MiB",
    ]
    body = []
    timing = {r["case"]: r for r in rows}
    for tool in TOOLS:
        if not versions[tool]:
            body.append([tool, "not installed", *[""] * 6])
            continue

        def n(group: str, *kinds: str, tool: str = tool) -> str:
            return str(sum(f["group"] == group and f["verdicts"][tool] in kinds for f in files))

        r = timing[tool]
        name = tool if tool == "surgery" else f"{tool} {versions[tool]}"
        if tool == "fickling-malicious":
            name = f"fickling {versions[tool]}, only likely overtly malicious"
        body.append(
            [
                name,
                n("hostile", "caught"),
                n("hostile", "clean"),
                n("hostile", "error", "not scanned"),
                n("benign", "caught", "error"),
                n("harmless", "caught"),
                f"{r['median_s']:.2f}",
                f"{harness.mib(r['max_rss_kib']):.0f}",
            ]
        )
    return harness.markdown_table(head, "lrrrrrrr", body)


if __name__ == "__main__":
    sys.exit(main())
