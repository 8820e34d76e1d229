"""surgery: inspect, port and operate on PyTorch checkpoints, safely.

    >>> import surgery
    >>> ckpt = surgery.open_checkpoint("fixtures/imagenet_example.pth.tar")
    >>> ckpt.container, ckpt.num_tensors
    (('state_dict',), 14)

Importing surgery does not import torch; reading tensors does.
"""

from __future__ import annotations

__version__ = "0.1.0"

from surgery.errors import (
    CorruptCheckpoint,
    NotACheckpoint,
    NotFound,
    SurgeryError,
    UnsupportedTensor,
    UsageError,
)

# Imported on first use, so `import surgery` (and every CLI start) stays light.
_LAZY = {
    "Checkpoint": "surgery.formats.checkpoint",
    "Extra": "surgery.formats.checkpoint",
    "TensorInfo": "surgery.formats.checkpoint",
    "open_checkpoint": "surgery.formats.checkpoint",
    "Finding": "surgery.values",
    "port": "surgery.commands.port",
    "PortReport": "surgery.commands.port",
    "PortFailed": "surgery.commands.port",
    "LossyCast": "surgery.casts",
    "PortOptions": "surgery.plans.match",
    "PortRequest": "surgery.commands.port_request",
    "port_file": "surgery.commands.port",
    "KeyRules": "surgery.plans.keys",
    "load_ready": "surgery.models.recipe",
    "Ready": "surgery.models.recipe",
    "Recipe": "surgery.models.recipe",
    "set_lr": "surgery.models.finetune",
    "convert": "surgery.commands.convert",
    "convert_file": "surgery.commands.convert",
    "ConvertRequest": "surgery.commands.convert",
    "ConvertReport": "surgery.commands.convert",
    "merge": "surgery.commands.merge",
    "merge_file": "surgery.commands.merge",
    "MergeRequest": "surgery.commands.merge",
    "MergeReport": "surgery.commands.merge",
    "extract": "surgery.commands.extract",
    "extract_file": "surgery.commands.extract",
    "ExtractRequest": "surgery.commands.extract",
    "ExtractReport": "surgery.commands.extract",
    "diff": "surgery.commands.diff",
    "diff_files": "surgery.commands.diff",
    "DiffRequest": "surgery.commands.diff",
    "DiffReport": "surgery.commands.diff",
    "scan": "surgery.commands.scan",
    "ScanReport": "surgery.commands.scan",
    "ScanResult": "surgery.commands.scan",
    "sanitize": "surgery.commands.sanitize",
    "SanitizeReport": "surgery.commands.sanitize",
    "check": "surgery.models.check",
    "CheckResult": "surgery.models.check",
}


def __getattr__(name: str):
    """The public calls and types, each imported from its module on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")


__all__ = [
    "Checkpoint",
    "CheckResult",
    "ConvertReport",
    "DiffReport",
    "CorruptCheckpoint",
    "Extra",
    "Finding",
    "KeyRules",
    "PortFailed",
    "LossyCast",
    "PortReport",
    "PortRequest",
    "SanitizeReport",
    "ScanReport",
    "ScanResult",
    "NotACheckpoint",
    "NotFound",
    "SurgeryError",
    "TensorInfo",
    "UnsupportedTensor",
    "UsageError",
    "check",
    "convert",
    "convert_file",
    "ConvertRequest",
    "diff",
    "diff_files",
    "DiffRequest",
    "extract",
    "extract_file",
    "ExtractRequest",
    "ExtractReport",
    "load_ready",
    "merge",
    "merge_file",
    "MergeRequest",
    "MergeReport",
    "open_checkpoint",
    "port",
    "port_file",
    "sanitize",
    "scan",
    "set_lr",
]
