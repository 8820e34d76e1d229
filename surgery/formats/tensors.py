"""Turning tensor stand-ins into real tensors, straight from the file's bytes.

Each storage is mapped copy-on-write (`mmap.ACCESS_COPY`) and wrapped with
`torch.frombuffer`, then viewed with the dtype, shape, stride and offset the
pickle or header declared: the same tensor `torch.load(mmap=True)` builds,
without unpickling anything. A storage whose bytes do not start at a multiple
of its element size (legacy files, odd safetensors headers) is copied to
aligned memory first, as `torch.load` does for legacy files. Tensors that share a storage in the file share it
here too, and pages are read only when a tensor is used; writes to a tensor
never reach the file.
"""

from __future__ import annotations

import itertools
import mmap
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from surgery.errors import CorruptCheckpoint, UnsupportedTensor
from surgery.formats.base import tensor_problem
from surgery.formats.numpy_pickle import PickledBytes
from surgery.formats.torch_pickle import DataLocation, StorageRef, TensorRef

if TYPE_CHECKING:
    import torch


class TensorReader:
    """Reads tensors of one checkpoint, sharing storages and file mappings."""

    def __init__(self, where: str):
        self.where = where
        self._maps: dict[str, mmap.mmap] = {}
        self._storages: dict[tuple[int, str], torch.Tensor] = {}
        self._raw: dict[int, torch.Tensor] = {}  # each root storage's bytes, shared by its dtype views

    def read(self, name: str, ref: TensorRef) -> torch.Tensor:
        import torch

        if ref.chunks is not None and not ref.unusual:
            return self._assemble(name, ref)
        if ref.unusual:
            raise UnsupportedTensor(
                self.where,
                f"tensor {name!r} is {ref.unusual}: surgery lists it but does not rebuild it",
                hint="convert the folder with torch.distributed.checkpoint.format_utils.dcp_to_torch_save"
                if ref.chunks is not None
                else "load the file with torch.load(path, weights_only=True)",
            )
        problem = tensor_problem(ref)
        if problem:
            raise CorruptCheckpoint(self.where, f"tensor {name!r} {problem}")
        dtype = getattr(torch, ref.dtype.name)
        storage = ref.storage
        if storage is None:  # cannot happen without `unusual`; kept for type checkers
            raise UnsupportedTensor(self.where, f"tensor {name!r} has no data")
        try:
            typed = self._typed(storage, dtype, ref.dtype.itemsize)
            offset = storage.view_offset // ref.dtype.itemsize + ref.offset
            out = typed.as_strided(ref.shape, ref.stride, offset)
            if ref.bits:
                torch._utils.set_tensor_metadata(out, ref.bits)
            if ref.parameter:
                return torch.nn.Parameter(out, requires_grad=ref.requires_grad)
            if ref.requires_grad:
                out.requires_grad_(True)
            return out
        except (
            RuntimeError,
            ValueError,
            TypeError,
            OverflowError,
        ) as exc:  # torch refuses what the file declares
            raise CorruptCheckpoint(
                self.where, f"tensor {name!r} cannot be built as declared: {exc}"
            ) from None

    def _assemble(self, name: str, ref: TensorRef) -> torch.Tensor:
        """A tensor saved in chunks (DCP from several ranks), copied together into new memory."""
        import torch

        out = torch.empty(ref.shape, dtype=getattr(torch, ref.dtype.name))
        for offsets, piece in ref.chunks or ():
            index = tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape, strict=True))
            out[index] = self.read(name, piece)
            self.release(piece)
        return out

    def release(self, ref: TensorRef) -> None:
        """Forget a tensor's storage and drop its pages from this process.

        For streaming: after a tensor is copied out, its pages no longer count
        in this process's memory; the file is read again if it is used again.
        Only for tensors not handed to a caller: their pages revert to the file.
        """
        for _, piece in ref.chunks or ():
            self.release(piece)
        base = ref.storage.base if ref.storage else None
        if base is None or base.data is None:
            return
        self._raw.pop(id(base), None)
        for key in [k for k in self._storages if k[0] == id(base)]:
            del self._storages[key]
        data = base.data
        mm = self._maps.get(data.path)
        if mm is None or data.member is not None or data.size == 0 or not hasattr(mm, "madvise"):
            return
        start = data.offset - data.offset % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, start, data.offset + data.size - start)

    def read_all(self, refs: Iterable[tuple[str, TensorRef]]) -> dict[str, torch.Tensor]:
        return {name: self.read(name, ref) for name, ref in refs}

    def _typed(self, storage: StorageRef, dtype: torch.dtype, itemsize: int) -> torch.Tensor:
        """The whole root storage as a 1-D tensor of `dtype`, shared between views."""
        base = storage.base
        key = (id(base), str(dtype))
        cached = self._storages.get(key)
        if cached is not None:
            return cached
        raw = self._raw.get(id(base))
        if raw is None or raw.data_ptr() % itemsize:
            raw = self._bytes(base.data)  # type: ignore[arg-type]
            if raw.data_ptr() % itemsize:  # legacy files and odd safetensors headers: copy to aligned memory
                raw = raw.clone()
            self._raw[id(base)] = raw
        usable = raw.numel() - raw.numel() % itemsize
        typed = raw[:usable].view(dtype)
        if base.data.byteswap and itemsize > 1:  # type: ignore[union-attr]
            import torch

            typed = (
                raw[:usable].view(-1, itemsize).flip(1).contiguous().view(torch.uint8).view(-1).view(dtype)
            )
        self._storages[key] = typed
        return typed

    def _bytes(self, data: DataLocation) -> torch.Tensor:
        import torch

        if data.size == 0:
            return torch.empty(0, dtype=torch.uint8)
        if isinstance(data, PickledBytes):  # held in memory: the file holds them re-encoded
            return torch.frombuffer(bytearray(data.raw), dtype=torch.uint8)
        mm = self._maps.get(data.path)
        if mm is None:
            with open(data.path, "rb") as f:
                mm = self._maps[data.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if data.member is not None:  # a compressed zip member: inflated into its declared size
            from surgery.formats.torchzip import inflate_storage

            with memoryview(mm) as file:
                return torch.frombuffer(inflate_storage(self.where, data, file), dtype=torch.uint8)
        return torch.frombuffer(mm, dtype=torch.uint8, count=data.size, offset=data.offset)


def plain(t: torch.Tensor) -> torch.Tensor:
    """`t` with its conjugate and negative bits applied: the values torch shows, laid out
    as a tensor saved without the bits would hold them. Byte-level work needs this (torch
    refuses to view a conjugate tensor as bytes, and a negative view's bytes are not its
    values); a tensor without bits comes back as it is, uncopied."""
    return t.resolve_conj().resolve_neg()


def flat_pieces(t: torch.Tensor, elements: int = 1 << 22) -> Iterator[torch.Tensor]:
    """The values of `t` in C order as flat, contiguous, plain pieces of at most `elements`.

    Memory follows the piece whatever the tensor's layout: a strided or expanded view
    (stride 0: 2**40 elements from 4 bytes) is never copied whole, as `reshape(-1)` would.
    """
    t = t.detach()
    shape = tuple(t.shape)
    if t.numel() == 0:
        return
    # The trailing dims [k:] hold `inner` elements, as many as fit in one piece;
    # dim k-1 is cut into runs of `step` of them, for every index of the dims before it.
    k, inner = len(shape), 1
    while k > 0 and inner * shape[k - 1] <= elements:
        k -= 1
        inner *= shape[k]
    if k == 0:
        yield _dense(t)
        return
    step = max(1, elements // inner)
    for index in itertools.product(*map(range, shape[: k - 1])):
        rows = t[index]
        for start in range(0, shape[k - 1], step):
            yield _dense(rows[start : start + step])


def _dense(t: torch.Tensor) -> torch.Tensor:
    """`t` flat, plain and with stride 1 (a copy only when its layout is otherwise)."""
    import torch

    flat = plain(t.reshape(-1))
    return flat if flat.stride() == (1,) else flat.clone(memory_format=torch.contiguous_format)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes (NaNs included, -0.0 is not 0.0): what a copy must give.
    Conjugate and negative bits are applied first: values are compared as torch shows them."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    flat_a = plain(a.detach()).contiguous().reshape(-1)
    flat_b = plain(b.detach()).contiguous().reshape(-1)
    if a.dtype == torch.bool:
        flat_a, flat_b = flat_a.to(torch.uint8), flat_b.to(torch.uint8)
    return torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8))


def same_range(a: tuple[str, int, int], b: tuple[str, int, int], chunk: int = 16 << 20) -> bool:
    """Whether two byte ranges `(file, offset, length)` hold the same bytes: compared without
    torch, a chunk at a time into two reused buffers, so memory is two chunks whatever the size."""
    (path_a, at_a, n), (path_b, at_b, n_b) = a, b
    if n != n_b:
        return False
    buf_a, buf_b = bytearray(min(chunk, n)), bytearray(min(chunk, n))
    with open(path_a, "rb", buffering=0) as fa, open(path_b, "rb", buffering=0) as fb:
        for done in range(0, n, chunk):
            size = min(chunk, n - done)
            if not (
                _read_at(fa.fileno(), buf_a, size, at_a + done)
                and _read_at(fb.fileno(), buf_b, size, at_b + done)
            ):
                return False  # a file ends inside its range
            same = buf_a == buf_b if size == len(buf_a) else buf_a[:size] == buf_b[:size]  # memcmp
            if not same:
                return False
    return True


def _read_at(fd: int, buf: bytearray, size: int, offset: int) -> bool:
    """Fill `buf[:size]` from the file's byte `offset`; False when the file ends first."""
    view = memoryview(buf)[:size]
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            return False
        view, offset = view[n:], offset + n
    return True
