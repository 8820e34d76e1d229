"""surgery: inspect, port and operate on PyTorch checkpoints, safely.

    >>> import surgery
    >>> ckpt = surgery.open_checkpoint("fixtures/imagenet_example.pth.tar")
    >>> ckpt.container, ckpt.num_tensors
    (('state_dict',), 12)

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

__all__ = [
    "Checkpoint",
    "CorruptCheckpoint",
    "Extra",
    "Finding",
    "NotACheckpoint",
    "NotFound",
    "SurgeryError",
    "TensorInfo",
    "UnsupportedTensor",
    "UsageError",
    "open_checkpoint",
]
