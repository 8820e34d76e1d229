"""surgery: inspect, port and operate on PyTorch checkpoints, safely.

    >>> import surgery
    >>> ckpt = surgery.open_checkpoint("fixtures/imagenet_example.pth.tar")
    >>> ckpt.container, ckpt.num_tensors
    (('state_dict',), 14)

Importing surgery does not import torch; reading tensors does.
"""

from __future__ import annotations

__version__ = "0.1.0"

from surgery.checkpoint import Checkpoint, Extra, TensorInfo, open_checkpoint
from surgery.errors import (
    CorruptCheckpoint,
    NotACheckpoint,
    NotFound,
    SurgeryError,
    UnsupportedTensor,
    UsageError,
)
from surgery.safety import Finding


def __getattr__(name: str):
    """`surgery.port` and its report types, imported on first use (they need torch)."""
    if name in ("port", "PortReport", "PortFailed", "PortOptions"):
        import importlib

        return getattr(importlib.import_module("surgery.porting"), name)
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")


__all__ = [
    "Checkpoint",
    "CorruptCheckpoint",
    "Extra",
    "Finding",
    "PortFailed",
    "PortReport",
    "NotACheckpoint",
    "NotFound",
    "SurgeryError",
    "TensorInfo",
    "UnsupportedTensor",
    "UsageError",
    "open_checkpoint",
    "port",
]
