"""Hugging Face model folders: `config.json` beside the weights `save_pretrained` writes.

Such a folder opens as one checkpoint: its weights file (or sharded index) is read as any
other file, and config.json, plain JSON, says which model it is (architectures,
model_type) for inspect, for `hf:` targets and for `--format hf` outputs. Nothing in the
folder is imported or run: a config whose `auto_map` names the repository's own code is
reported, and that code is never loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from surgery.errors import NotACheckpoint, NotFound, SurgeryError
from surgery.formats.base import Scan, named_file, refuse_not_regular
from surgery.values import Finding

CONFIG = "config.json"
# The weights `from_pretrained` reads, in the order it prefers them.
WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
MAX_CONFIG_BYTES = 10_000_000


def weights_of(folder: Path) -> list[str]:
    """The weights files of a Hugging Face model folder, preferred first; [] when `folder`
    holds no config.json or none of them (then it is no such folder)."""
    if not (folder / CONFIG).exists():
        return []
    return [name for name in WEIGHTS if (folder / name).exists()]


def read_config(path: Path) -> dict[str, Any]:
    """A config.json as a dict: JSON read as data, never a file it names.

    Args:
        path: the config.json, or the folder holding it.

    Raises:
        NotFound: no config.json there.
        NotACheckpoint: not a JSON object, or too big to be a config.
    """
    path = path / CONFIG if path.is_dir() else path
    if not path.exists():
        raise NotFound(path, "no such file")
    refuse_not_regular(path)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise NotACheckpoint(path, f"over {MAX_CONFIG_BYTES:,} bytes: not a model config")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, ints over 4300 digits
        raise NotACheckpoint(path, f"not a JSON model config ({exc})") from None
    except OSError as exc:
        raise NotFound(path, f"cannot read: {exc.strerror or exc}") from None
    if not isinstance(doc, dict):
        raise NotACheckpoint(path, f"a JSON {type(doc).__name__}, not a model config (an object)")
    return doc


def architectures(config: dict[str, Any]) -> list[str]:
    """The model classes a config names (`["BertForMaskedLM"]`), strings only."""
    names = config.get("architectures")
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def remote_code(config: dict[str, Any]) -> list[str]:
    """What the config's `auto_map` names: the repository's own Python code, which
    transformers imports with `trust_remote_code=True` and surgery never does."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        return []
    found: list[str] = []
    for value in auto_map.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item not in found:
                found.append(item)
    return found


def describe_config(config: dict[str, Any]) -> str:
    """`BertForMaskedLM (model_type bert)`: the line inspect shows."""
    names = ", ".join(architectures(config)) or "no architectures"
    model_type = config.get("model_type")
    return names + (f" (model_type {model_type})" if isinstance(model_type, str) else "")


def scan_hf_folder(folder: Path, weights: list[str], scan_file: Callable[[Path], Scan]) -> Scan:
    """The folder's preferred weights read by `scan_file`, with its config beside them.

    The Scan keeps the weights' own format (safetensors, sharded, ...), so every reader
    and writer works on it as on the file alone; its metadata adds `hf_folder` and
    `hf_config` (architectures, model_type), and a readable config.json joins the files read.
    """
    config_path = folder / CONFIG
    chosen = named_file(config_path, folder, weights[0], "the folder holds")
    inner = scan_file(chosen)
    findings = list(inner.findings)
    if len(weights) > 1:
        also = ", ".join(weights[1:])
        findings.append(
            Finding(
                "notice",
                f"the folder also holds {also}; {weights[0]} is read, as from_pretrained does",
                str(folder),
            )
        )
    summary: dict[str, Any] = {}
    files = list(inner.files)
    try:
        config = read_config(named_file(folder, folder, CONFIG, "the folder holds"))
    except SurgeryError as exc:
        findings.append(Finding("notice", f"{CONFIG}: {exc.message}", str(config_path)))
        line = f"{CONFIG} not readable"
    else:
        files.insert(0, config_path)  # part of the source: hashed into a port's provenance
        summary = {"architectures": architectures(config), "model_type": config.get("model_type")}
        line = describe_config(config)
        code = remote_code(config)
        if code:
            summary["auto_map"] = code
            findings.append(
                Finding(
                    "notice",
                    f"{CONFIG} names remote code in auto_map ({', '.join(code[:3])}): transformers would "
                    "import it with trust_remote_code=True; surgery reads the weights and never imports it",
                    str(config_path),
                )
            )
    metadata = {**inner.metadata, "hf_folder": str(folder), "hf_config": summary, "hf_config_line": line}
    description = f"Hugging Face model folder: {inner.description}"
    return Scan(inner.path, inner.format, description, inner.root, findings, metadata, files)
