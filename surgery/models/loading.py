"""Plans to tensors in modules: copying matched tensors into a built target, and the
target's complete state_dict handed to a writer one tensor at a time.

Both read the source through its memory map, one tensor at a time, and give the
pages back when done, so memory follows the largest tensor, not the checkpoint; a
template target's bytes that can be written as they lie are not read here at all, but
copied file to file by the writer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from surgery.casts import CastLosses
    from surgery.formats.checkpoint import Checkpoint
    from surgery.models.targets import Target
    from surgery.plans.match import PortPlan
    from surgery.writers.copy import RawBytes


def load_into(module: nn.Module, ckpt: Checkpoint, plan: PortPlan) -> None:
    """Copy every matched tensor into `module`, one at a time, casting dtype and
    reshaping where the plan says; nothing else in `module` changes.

    A parameter sharded across ranks (a DTensor: `fully_shard`, tensor parallel) gets only its
    own block, read as the rows of it in the file: no rank reads or holds the whole model."""
    import torch

    state = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for m in plan.matched:
            copy_into(state[m.target], ckpt, m.source, m.shape if m.source_shape is not None else None)


def copy_into(
    target: torch.Tensor, ckpt: Checkpoint, source: str, reshape: tuple[int, ...] | None = None
) -> None:
    """One source tensor into `target` (cast to its dtype; reshaped first when `reshape`), its
    pages given back after. A DTensor target gets only its own block: the rows of it, read as
    such where the tensor lies as plain data."""
    if _is_dtensor(target) and reshape is None:
        local = target.to_local()
        shape, offset = _local_block(target)
        rows = offset[0] if shape else 0
        value = ckpt.rows(source, rows, rows + shape[0]) if shape else ckpt.tensor(source)
        block = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:], strict=True))
        local.copy_(value[(slice(None), *block)] if shape else value)
    else:
        value = ckpt.tensor(source)
        if reshape is not None:
            value = value.reshape(reshape)
        if _is_dtensor(target):
            shape, offset = _local_block(target)
            value = value[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
            target = target.to_local()
        target.copy_(value)
    del value
    ckpt.release(source)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" or type(getattr(tensor, "data", None)).__name__ == "DTensor"


def _local_block(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """This rank's block of a DTensor: its shape and where it starts in the whole tensor (as
    torch.distributed.checkpoint finds it)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(shape), tuple(offset)


def cast_losses(ckpt: Checkpoint, plan: PortPlan) -> dict[str, CastLosses]:
    """What loading each matched tensor in its target's dtype would lose (overflow to inf,
    NaN, flushed to zero), by target key: read before anything is loaded or written, piece
    by piece, and only for the casts that can lose (`casts.may_lose`): torch is imported
    only then."""
    from surgery.casts import CastLosses, count_losses, may_lose

    narrowing = [m for m in plan.matched if m.cast is not None and may_lose(*m.cast)]
    if not narrowing:
        return {}
    import torch

    lossy = {}
    for m in narrowing:
        dtype, lost = getattr(torch, m.cast[1]), CastLosses(*m.cast)
        try:
            for piece in ckpt.pieces(m.source):
                cast = piece.to(dtype).view(torch.uint8).numpy()
                lost += count_losses(piece.view(torch.uint8).numpy(), cast, *m.cast)
        finally:
            ckpt.release(m.source)
        if lost:
            lossy[m.target] = lost
    return lossy


class Output:
    """The target's complete state_dict, one tensor at a time.

    A built target (already loaded) gives its own tensors. A template target, or a target
    described on the meta device whose every key the source fills, gives
    the template's tensors with matched keys taken from the source: as the file's
    byte range when the bytes can be written as they lie (`file_bytes`: copied file to
    file, no torch), else as tensors built when asked for. Both files stay
    memory-mapped and `release` gives their pages back, so memory follows the largest
    tensor, not the checkpoint.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        target: Target,
        plan: PortPlan,
        transformed: set[str] = frozenset(),
        *,
        raw: bool = True,
    ):
        """`raw`: the writer takes byte ranges (`RawBytes`); False where it needs tensors."""
        self.ckpt, self.target, self.plan, self.raw = ckpt, target, plan, raw
        self.by_target = {m.target: m for m in plan.matched if m.target not in transformed}
        for alias, kept in plan.tied:  # the same tensor under its other name
            if kept in self.by_target:
                self.by_target[alias] = self.by_target[kept]
        self.dtypes = {e.name: e.dtype for e in target.entries}
        # A target built on the meta device has no values: every key comes from the source.
        built = target.module is not None and not target.meta
        self.state = target.module.state_dict() if built else None

    def file_bytes(self, name: str) -> RawBytes | None:
        """Where in a file (the source's, or the template's) the bytes of a template
        target's key lie exactly as they are to be written; None when the tensor is built
        (a built target's own tensors, casts, strided or compressed storage)."""
        if self.state is not None or not self.raw:
            return None
        from surgery.writers.copy import RawBytes

        m = self.by_target.get(name)
        if m is None:
            template = self.target.template
            assert template is not None
            where = template.byte_range(name)
        else:
            where = self.ckpt.byte_range(m.source) if m.cast is None else None
        return RawBytes(*where) if where is not None else None

    @property
    def needs_torch(self) -> bool:
        """Whether writing will build a tensor (else every byte is copied as it lies)."""
        return any(self.file_bytes(e.name) is None for e in self.target.entries)

    def get(self, name: str) -> torch.Tensor | RawBytes:
        if self.state is not None:
            return self.state[name].detach().cpu()
        raw = self.file_bytes(name)
        if raw is not None:
            return raw
        if name in self.by_target:
            return self.source_of(name)
        template = self.target.template
        assert template is not None
        return template.tensor(name)

    def source_of(self, name: str) -> torch.Tensor | None:
        """The source tensor a target key is loaded from, shaped and cast as the target's
        (None for keys not loaded, or changed after loading such as an adapted first conv)."""
        m = self.by_target.get(name)
        if m is None:
            return None
        import torch

        value = self.ckpt.tensor(m.source).reshape(m.shape)
        dtype = getattr(torch, self.dtypes[name])
        return value if value.dtype == dtype else value.to(dtype)

    def release(self, name: str) -> None:
        m = self.by_target.get(name)
        if m is not None:
            self.ckpt.release(m.source)
        if self.target.template is not None:
            self.target.template.release(name)
