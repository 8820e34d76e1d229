"""BatchNorm layers whose statistics stay fixed: eval behaviour even under model.train().

A frozen layer's class becomes the matching subclass here, whose `train()` keeps
it in eval mode. Its parameters, buffers and state_dict keys stay the same, and
being importable classes, frozen models deepcopy and pickle as usual.
"""

from __future__ import annotations

from torch import nn


class _KeepsStatistics:
    def train(self, mode: bool = True):
        return super().train(False)  # type: ignore[misc]


class FrozenBatchNorm1d(_KeepsStatistics, nn.BatchNorm1d):
    pass


class FrozenBatchNorm2d(_KeepsStatistics, nn.BatchNorm2d):
    pass


class FrozenBatchNorm3d(_KeepsStatistics, nn.BatchNorm3d):
    pass


class FrozenSyncBatchNorm(_KeepsStatistics, nn.SyncBatchNorm):
    pass


_FROZEN = {
    nn.BatchNorm1d: FrozenBatchNorm1d,
    nn.BatchNorm2d: FrozenBatchNorm2d,
    nn.BatchNorm3d: FrozenBatchNorm3d,
    nn.SyncBatchNorm: FrozenSyncBatchNorm,
}


def freeze_batchnorm(module: nn.Module) -> None:
    """Fix a BatchNorm layer's statistics and parameters, in place."""
    for param in module.parameters(recurse=False):
        param.requires_grad_(False)
    frozen = _FROZEN.get(type(module))
    if frozen is not None:
        module.__class__ = frozen
    module.eval()
