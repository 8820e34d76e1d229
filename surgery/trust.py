"""Names read from a file are data: what may be built from a file's contents without `trust`.

A checkpoint, a recipe file or a plan can name a target to build. Library targets
(`torchvision:NAME`, `timm:NAME`, `hf:ClassName` or `hf:FOLDER`) only pick one of the
library's own builders (for `hf:`, one of the `transformers` package's own model classes,
built from a config: never `from_pretrained`, never remote code), with literal arguments. Anything else (`package.module:callable`) would import a module
and call into it: written on the command line it is the user's choice; read from a
file it runs only when the caller says `trust`. Pure functions over strings: no
torch, no imports by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.values import Finding

LIBRARY_TARGETS = ("torchvision", "timm", "hf")
RECIPE_KEY = "surgery.recipe"
# Builder keywords that make a library load a file or download one: never taken,
# whoever names them (surgery loads weights itself, from their bytes).
LOADING_KWARGS = {
    "torchvision": ("weights", "weights_backbone"),
    "timm": ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"),
    # from_pretrained's own keywords, and what makes transformers import a repository's code
    "hf": (
        "pretrained",
        "pretrained_model_name_or_path",
        "trust_remote_code",
        "auto_map",
        "code_revision",
        "revision",
        "cache_dir",
        "token",
        "use_auth_token",
        "local_files_only",
        "force_download",
        "proxies",
        "subfolder",
        "state_dict",
        "from_tf",
        "from_flax",
        "use_safetensors",
        "weights_only",
        "_commit_hash",
    ),
}


class Untrusted(SurgeryError):
    """A file names code to import and call, and the caller did not pass `trust`."""


def library_of(spec: str) -> str | None:
    """`torchvision` for `torchvision:resnet18?num_classes=2`; None for anything else."""
    kind, sep, name = spec.partition("?")[0].partition(":")
    return kind if sep and name and kind in LIBRARY_TARGETS else None


def imports_code(spec: str) -> bool:
    """Whether building `spec` would import a module by name: a `package.module:callable`
    target (a checkpoint file used as a template is read, never run)."""
    base = spec.partition("?")[0]
    kind, sep, name = base.partition(":")
    return bool(sep and kind and name) and library_of(spec) is None and not Path(base).exists()


def require_trust(spec: str, where: object, *, trust: bool, named_by: str = "the file") -> None:
    """Refuse to build a target that imports code when its name was read from a file.

    Raises:
        Untrusted: naming the file, the target and the fix.
    """
    if trust or not imports_code(spec):
        return
    raise Untrusted(
        where,
        f"{named_by} names the target {spec!r}, which would import and call code; refused",
        hint="pass --trust (trust=True) if you wrote it or know what it runs",
    )


def recipe_findings(metadata: dict[str, Any], where: str) -> list[Finding]:
    """A danger finding when a fine-tune recipe stored in a file names a target that
    imports code: `surgery.load_ready` before 0.2 imported and called it unasked."""
    stored = metadata.get("metadata") if isinstance(metadata, dict) else None
    text = stored.get(RECIPE_KEY) if isinstance(stored, dict) else None
    if not isinstance(text, str):
        return []
    try:
        target = json.loads(text).get("target")
    except (ValueError, AttributeError, RecursionError):
        return [Finding("notice", f"the fine-tune recipe ({RECIPE_KEY}) is not a JSON object", where)]
    if not isinstance(target, str):
        return [Finding("notice", f"the fine-tune recipe ({RECIPE_KEY}) has no target", where)]
    if not imports_code(target):
        return []
    shown = target if len(target) <= 200 else target[:197] + "..."
    return [
        Finding(
            "danger",
            f"the fine-tune recipe names the target {shown!r}: rebuilding it would import and call "
            "code named by the file (surgery.load_ready refuses it without trust=True)",
            where,
        )
    ]
