"""Casts without torch: float32 to bfloat16 and to float16 in numpy, bit for bit what torch's
`.to()` gives, so `convert --dtype bf16|fp16` of a float32 file does not pay torch's import
(1.5-2.5 s and 630 MiB here, more than the whole cast of a 1 GB file).

Both are integer arithmetic on the float32 bits, rounding to nearest even as IEEE and torch
do: bfloat16 keeps the high 16 bits after adding `0x7FFF` plus the lowest kept bit (torch's own
formula); float16 rounds the same way at bit 13 and rebiases the exponent, clamps overflow to
infinity, and makes its subnormals with one float32 addition of 0.5, whose hardware rounding is
the rounding wanted. Every one of the 2**32 float32 bit patterns that is not a NaN gives torch's
bits (checked with torch 2.14 on x86-64 for its AVX512, AVX2 and scalar kernels: they agree with
each other there; `SURGERY_EXHAUSTIVE_CASTS=1 pytest tests/test_convert_speed_paths.py` runs it).

NaN is where torch's kernels disagree among themselves (bfloat16: 0xFFFF from the vector kernels,
0x7FC0 from the scalar one, which also serves 0-dim tensors), so a piece holding a NaN is cast
by torch, as every piece was before: the output is the same as torch's piece cast, whatever
kernel this machine's torch picks.

The cast is the one part of a conversion that needs the CPU (float16: ~15 passes over each
block), so each piece is cast in shares on every core this process may use: numpy lets go of
the GIL inside its loops.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from surgery.errors import CorruptCheckpoint

if TYPE_CHECKING:
    import numpy as np

# Elements per piece: 16 MiB of float32 read, 8 MiB written. Memory: the piece read, plus the
# pieces cast and not yet written (see copy.Sink).
PIECE = 1 << 22
# Elements per numpy step: the step's scratch (three arrays of this many words) stays in the L2
# cache, so each of its ~15 passes runs at cache speed; 64K is the fastest measured here.
BLOCK = 1 << 16

CASTS = {("float32", "bfloat16"), ("float32", "float16")}


def _cores() -> int:
    """Cores this process may run on (its affinity, not the machine's count), at most 4: the
    disk, not the cast, is the limit beyond that."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, min(4, len(usable)))


def casts_without_torch(source: str, target: str) -> bool:
    """Whether `source` -> `target` (dtype names) is cast here without torch (the file's
    little-endian words read as they are: on a little-endian machine)."""
    return (source, target) in CASTS and sys.byteorder == "little"


class _Kernel:
    """One cast, block by block, into caller-given output: scratch allocated once."""

    def __init__(self, target: str):
        import numpy as np

        self.np = np
        self.step = self._bfloat16 if target == "bfloat16" else self._float16
        self.a = np.empty(BLOCK, np.uint32)
        self.b = np.empty(BLOCK, np.uint32)
        self.c = np.empty(BLOCK, np.uint32)
        self.small = np.empty(BLOCK, np.bool_)

    def __call__(self, bits: np.ndarray, out: np.ndarray) -> bool:
        """`bits` (float32 as uint32) cast into `out` (uint16). False when a NaN was met: its
        elements of `out` are then not torch's."""
        clean = True
        with self.np.errstate(invalid="ignore"):  # a signalling NaN's + 0.5: that piece goes to torch
            for start in range(0, len(bits), BLOCK):
                clean &= self.step(bits[start : start + BLOCK], out[start : start + BLOCK])
        return clean

    def _bfloat16(self, x: np.ndarray, out: np.ndarray) -> bool:
        np, n = self.np, len(x)
        a, b = self.a[:n], self.b[:n]
        np.right_shift(x, 16, out=a)
        np.bitwise_and(a, 1, out=a)
        np.add(a, 0x7FFF, out=a)  # round to nearest, ties to the even value
        np.add(a, x, out=a)
        np.right_shift(a, 16, out=out, casting="unsafe")  # below 2**16: narrowing keeps every value
        np.bitwise_and(x, 0x7FFFFFFF, out=b)
        return bool(b.max() <= 0x7F800000)  # above: NaN

    _REBIAS = (0xFFF - (112 << 23)) & 0xFFFFFFFF  # half the dropped bits, less 127 - 15 exponents

    def _float16(self, x: np.ndarray, out: np.ndarray) -> bool:
        np, n = self.np, len(x)
        a, h, c, small = self.a[:n], self.b[:n], self.c[:n], self.small[:n]
        np.bitwise_and(x, 0x7FFFFFFF, out=a)  # |x|
        clean = bool(a.max() <= 0x7F800000)
        np.right_shift(a, 13, out=h)  # normal results: round at bit 13, rebias the exponent
        np.bitwise_and(h, 1, out=h)
        np.add(h, np.uint32(self._REBIAS), out=h)
        np.add(h, a, out=h)
        np.right_shift(h, 13, out=h)
        np.minimum(h, 0x7C00, out=h)  # too large: infinity (small values wrapped: replaced below)
        np.less(a, 0x38800000, out=small)  # below float16's smallest normal, 2**-14
        if small.any():  # subnormal or zero: |x| + 0.5 rounds at float16's last subnormal bit
            np.add(a.view(np.float32), np.float32(0.5), out=c.view(np.float32))
            np.subtract(c, 0x3F000000, out=c)
            np.copyto(h, c, where=small)
        np.right_shift(x, 16, out=c)
        np.bitwise_and(c, 0x8000, out=c)
        np.bitwise_or(h, c, out=out, casting="unsafe")  # the sign; below 2**16: narrowing keeps every value
        return clean


class Caster:
    """Casts tensors lying as plain float32 in files, piece by piece, for one conversion: its
    kernels' scratch, the buffer pieces are read into and the threads that cast a share of each
    piece are made once and reused. `close()` ends the threads."""

    def __init__(self, cores: int | None = None) -> None:
        self.cores = cores or _cores()
        self.kernels: dict[str, list[_Kernel]] = {}
        self.values: np.ndarray | None = None
        self.pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def pieces(
        self, path: str, offset: int, length: int, target: str
    ) -> Iterator[tuple[memoryview, memoryview]]:
        """The float32 tensor stored at `offset` of `path` (`length` bytes, little-endian) cast
        to `target`, PIECE elements at a time: (the piece as read, its cast). The cast is a new
        buffer the caller keeps; the piece as read is valid until the next one is asked for
        (it is read into one reused buffer), long enough to judge the cast by.

        Raises:
            CorruptCheckpoint: the file ends before the tensor does.
        """
        import numpy as np

        if self.values is None or len(self.values) < min(PIECE, length // 4):
            self.values = np.empty(min(PIECE, max(length // 4, BLOCK)), np.uint32)
        raw = memoryview(self.values).cast("B")
        with open(path, "rb", buffering=0) as f:
            for start in range(0, length, PIECE * 4):
                size = min(PIECE * 4, length - start)
                _read_exactly(f.fileno(), raw[:size], offset + start, path)
                bits = self.values[: size // 4]
                out = np.empty(size // 4, np.uint16)
                if not self._cast(bits, out, target):
                    out = _torch_cast(bits, target)
                yield memoryview(bits).cast("B"), memoryview(out).cast("B")

    def _cast(self, bits: np.ndarray, out: np.ndarray, target: str) -> bool:
        """`bits` cast into `out` in shares of whole blocks, one per core: the first in this
        thread, the others in the pool. False when a NaN was met."""
        kernels = self.kernels.get(target) or self.kernels.setdefault(
            target, [_Kernel(target) for _ in range(self.cores)]
        )
        share = -(-len(bits) // (len(kernels) * BLOCK)) * BLOCK
        parts = [
            (k, slice(i * share, (i + 1) * share)) for i, k in enumerate(kernels) if i * share < len(bits)
        ]
        if len(parts) == 1:
            return kernels[0](bits, out)
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.cores - 1, thread_name_prefix="surgery-cast")
        jobs = [self.pool.submit(kernel, bits[part], out[part]) for kernel, part in parts[1:]]
        kernel, part = parts[0]
        clean = kernel(bits[part], out[part])
        return all([job.result() for job in jobs]) and clean


def _read_exactly(fd: int, into: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if n <= 0:
            end = offset + len(into)
            raise CorruptCheckpoint(path, f"ends before byte {end}: the source changed or is truncated")
        done += n


def _torch_cast(bits: np.ndarray, target: str) -> np.ndarray:
    """A piece holding a NaN, cast by torch as a flat piece (as convert always cast pieces)."""
    import torch

    cast = torch.from_numpy(bits.view("float32")).to(getattr(torch, target))
    return cast.view(torch.int16).numpy().view("uint16")
