"""convert's fast paths, held to torch: the float32 -> bfloat16/float16 casts made in numpy
(surgery/writers/cast.py) give torch's bits, and the safetensors `Sink` (surgery/writers/copy.py)
copies raw ranges byte for byte and turns a failed write into one clean error with nothing left.

`SURGERY_EXHAUSTIVE_CASTS=1` also runs the casts over all 2**32 float32 bit patterns (a minute
or two); by default a dense sample of them: every exponent and sign, every rounding position's
ties and near-ties, subnormals, the largest finite values and overflow to infinity.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import Run, assert_clean_error, run_cli
from safetensors.torch import load_file

from surgery.commands import convert as convert_command
from surgery.writers import cast
from surgery.writers.cast import Caster, _Kernel, casts_without_torch
from surgery.writers.copy import Sink

TARGETS = {"bfloat16": torch.bfloat16, "float16": torch.float16}
NAN_BITS = 0x7F800000  # |bits| above this: a NaN


def _torch_bits(bits: np.ndarray, target: str) -> np.ndarray:
    """torch's `.to(target)` of float32 words given as uint32, as uint16 words."""
    cast_ = torch.from_numpy(bits.view(np.float32)).to(TARGETS[target])
    return cast_.view(torch.int16).numpy().view(np.uint16)


def _kernel_bits(bits: np.ndarray, target: str) -> tuple[np.ndarray, bool]:
    out = np.empty(len(bits), np.uint16)
    clean = _Kernel(target)(bits, out)
    return out, clean


def _mismatches(bits: np.ndarray, target: str) -> list[str]:
    got, clean = _kernel_bits(bits, target)
    assert clean, "a non-NaN sample was reported as holding a NaN"
    want = _torch_bits(bits, target)
    wrong = np.flatnonzero(got != want)
    return [f"{bits[i]:#010x}: numpy {got[i]:#06x}, torch {want[i]:#06x}" for i in wrong[:10]]


def _dense_sample() -> np.ndarray:
    """Every sign and exponent (NaNs left out) times mantissas that put a tie, and the values
    either side of it, at every bit a cast can round at (subnormal float16 rounds higher up),
    with the kept bit even and odd; plus random mantissas."""
    mantissas = {0, 1, 0x7FFFFF, 0x400000, 0x3FFFFF}
    for k in range(1, 24):
        half = 1 << (k - 1)
        for kept in (0, 1, 0b11):
            high = (kept << k) & 0x7FFFFF
            for low in (half - 1, half, half + 1, 0, (1 << k) - 1):
                mantissas.add(high | low)
                mantissas.add((0x7FFFFF & ~((1 << k) - 1)) & ~(1 << k) | low)  # many high bits set
    rng = np.random.default_rng(0)
    mantissas |= set(rng.integers(0, 1 << 23, 2000, dtype=np.uint32).tolist())
    m = np.array(sorted(mantissas), np.uint32)
    signs_exponents = (np.arange(512, dtype=np.uint32) << 23)[:, None]
    bits = (signs_exponents | m[None, :]).reshape(-1)
    special = np.array(
        [
            0x7F7FFFFF,  # float32's largest finite
            0x477FEFFF,  # just below float16's largest finite, 65504
            0x477FF000,  # halfway between 65504 and infinity: rounds to infinity
            0x477FE000,  # 65504
            0x7F7F8000,  # bfloat16's rounding past its largest finite: infinity
            0x33000000,  # 2**-25: half float16's smallest subnormal, a tie to zero
            0x33000001,  # just above: the smallest subnormal
            0x387FC000,  # between float16's largest subnormal and smallest normal
        ],
        np.uint32,
    )
    bits = np.concatenate([bits, special, special | 0x80000000])
    return bits[(bits & 0x7FFFFFFF) <= NAN_BITS]


@pytest.fixture(scope="module")
def dense_sample() -> np.ndarray:
    return _dense_sample()


@pytest.mark.parametrize("target", TARGETS)
def test_numpy_cast_is_torchs_on_a_dense_sample_of_float32_bits(dense_sample, target):
    sample = dense_sample
    assert len(sample) > 500_000
    for must in (0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001, 0x007FFFFF, 0x7F7FFFFF):
        assert must in sample  # +-0.0, +-inf, subnormals, max finite
    assert _mismatches(sample, target) == []


@pytest.mark.parametrize("target,big", [("bfloat16", 3.4028235e38), ("float16", 65520.0)])
def test_numpy_cast_reaches_infinity_and_zero_as_torch_does(target, big):
    """The edges spelled out: overflow to infinity, underflow to (signed) zero."""
    values = np.array([big, -big, 1e-45, -1e-45, -0.0, 1.0], np.float32)
    got, clean = _kernel_bits(values.view(np.uint32), target)
    assert clean
    assert got.tolist() == _torch_bits(values.view(np.uint32), target).tolist()
    as_float = torch.from_numpy(got.view(np.int16)).view(TARGETS[target]).float().tolist()
    assert as_float == [float("inf"), float("-inf"), 0.0, 0.0, 0.0, 1.0]
    assert [str(v) for v in as_float[2:5]] == ["0.0", "-0.0", "-0.0"]


@pytest.mark.skipif(
    os.environ.get("SURGERY_EXHAUSTIVE_CASTS") != "1",
    reason="all 2**32 patterns: set SURGERY_EXHAUSTIVE_CASTS=1",
)
@pytest.mark.parametrize("target", TARGETS)
def test_numpy_cast_is_torchs_on_every_float32_bit_pattern(target):
    chunk = 1 << 24
    for start in range(0, 1 << 32, chunk):
        bits = np.arange(start, start + chunk, dtype=np.uint64).astype(np.uint32)
        bits = bits[(bits & 0x7FFFFFFF) <= NAN_BITS]
        got, _ = _kernel_bits(bits, target)
        wrong = np.flatnonzero(got != _torch_bits(bits, target))
        assert not len(wrong), f"{len(wrong)} differ from {bits[wrong[0]]:#010x}"


@pytest.mark.parametrize("target", TARGETS)
def test_numpy_cast_is_torchs_on_a_real_resnet18(seeded_resnet18, target):
    for name, tensor in seeded_resnet18.state.items():
        if tensor.dtype == torch.float32:
            bits = tensor.contiguous().view(torch.int32).numpy().view(np.uint32).reshape(-1)
            assert _mismatches(bits, target) == [], name


def _float32_file(path, values: np.ndarray, offset: int = 24) -> tuple[str, int, int]:
    """`values` stored at `offset` of a file, as a tensor lies in a checkpoint: (path, offset, length)."""
    data = values.astype("<f4").tobytes()
    path.write_bytes(b"x" * offset + data + b"tail")
    return str(path), offset, len(data)


@pytest.mark.filterwarnings("error")  # numpy's "invalid value" on a signalling NaN is not the user's business
@pytest.mark.parametrize("cores", [1, 3])
@pytest.mark.parametrize("target", TARGETS)
def test_a_piece_holding_nan_is_cast_as_torch_casts_it(tmp_path, monkeypatch, target, cores):
    """The kernel flags the NaN; that piece goes to torch, the others stay in numpy: the whole
    tensor as torch's piece-by-piece cast gives it, across pieces, blocks and the cores' shares
    (3 shares of a piece of 32 blocks: 11, 11, 10)."""
    monkeypatch.setattr(cast, "PIECE", 1 << 17)
    monkeypatch.setattr(cast, "BLOCK", 1 << 12)
    rng = np.random.default_rng(1)
    values = rng.standard_normal(3 * (1 << 17) + 5).astype(np.float32)  # a short last piece
    bits = values.view(np.uint32)
    bits[5] = 0x7FC00000  # a quiet NaN in the first piece
    bits[(1 << 17) + 7] = 0xFFA00001  # a negative signalling NaN in the second
    bits[2 * (1 << 17)] = 0x7F800000  # infinity, not a NaN, in the third
    where = _float32_file(tmp_path / "t.bin", values)
    caster = Caster(cores)
    got = np.concatenate([np.frombuffer(cast, np.uint16) for _, cast in caster.pieces(*where, target)])
    assert (caster.pool is not None) == (cores > 1)
    caster.close()
    pieces = [bits[i : i + (1 << 17)] for i in range(0, len(bits), 1 << 17)]
    want = np.concatenate([_torch_bits(p.copy(), target) for p in pieces])
    assert got.tolist() == want.tolist()
    kernel_out, clean = _kernel_bits(pieces[0].copy(), target)
    assert not clean  # the NaN is noticed
    _, clean = _kernel_bits(pieces[2].copy(), target)
    assert clean  # infinity is not a NaN


def test_cast_pieces_of_a_truncated_file_raise_a_clean_error(tmp_path):
    path, offset, length = _float32_file(tmp_path / "t.bin", np.ones(1000, np.float32))
    with pytest.raises(Exception, match="ends before byte") as caught:
        list(Caster().pieces(path, offset, length + 400, "bfloat16"))
    assert type(caught.value).__name__ == "CorruptCheckpoint"


def test_only_float32_to_bf16_and_fp16_skip_torch():
    assert casts_without_torch("float32", "bfloat16") and casts_without_torch("float32", "float16")
    assert not casts_without_torch("float64", "float16")
    assert not casts_without_torch("float16", "bfloat16")


# -- through the CLI -------------------------------------------------------------------------


def _no_torch_casts(monkeypatch) -> None:
    """Make torch's piece cast fail, so a pass proves the numpy path served every tensor."""

    def refuse(self, source, dtype_name):
        raise AssertionError(f"{source} was cast by torch")

    monkeypatch.setattr(convert_command._Source, "_cast", refuse)


@pytest.mark.parametrize("flag,target", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("source", ["safetensors", "plain"])
def test_convert_dtype_gives_torchs_cast_of_every_tensor(
    seeded_resnet18, tmp_path, monkeypatch, source, flag, target
):
    monkeypatch.setattr(cast, "PIECE", 1 << 16)  # resnet18's big convs in many pieces
    _no_torch_casts(monkeypatch)
    out = tmp_path / f"{flag}.safetensors"
    # fp16 flushes a few of resnet18's tiniest weights to zero: a lossy cast, allowed by name
    run = run_cli(
        "convert", getattr(seeded_resnet18, source), "-o", out, "--dtype", flag, "--allow-lossy-cast"
    )
    assert run.exit_code == 0, run.stderr
    got = load_file(out)
    assert sorted(got) == sorted(seeded_resnet18.state)
    for name, tensor in seeded_resnet18.state.items():
        want = tensor.to(target) if tensor.is_floating_point() else tensor
        assert got[name].dtype == want.dtype, name
        assert torch.equal(
            got[name].reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8)
        ), name


def _tensor_bytes(path) -> dict[str, bytes]:
    """Each tensor's bytes as they lie in a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return {k: raw[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]] for k, v in header.items()}


@pytest.mark.parametrize("source", ["safetensors", "plain"])
def test_raw_copies_are_byte_identical(seeded_resnet18, tmp_path, monkeypatch, source):
    _no_torch_casts(monkeypatch)
    out = tmp_path / "copy.safetensors"
    run = run_cli("convert", getattr(seeded_resnet18, source), "-o", out)
    assert run.exit_code == 0, run.stderr
    got = _tensor_bytes(out)
    assert sorted(got) == sorted(seeded_resnet18.state)
    for name, tensor in seeded_resnet18.state.items():
        assert got[name] == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name
    if source == "safetensors":
        assert got == _tensor_bytes(seeded_resnet18.safetensors)


# -- a write that fails ----------------------------------------------------------------------


def test_sink_raises_a_failed_write_and_stops_cleanly():
    """/dev/full refuses every write with ENOSPC: the error reaches the caller (at a later put or
    at close), and the thread drains what is queued, so nothing waits forever."""
    with open("/dev/full", "wb") as f:
        with pytest.raises(OSError) as caught, Sink(f) as sink:
            for _ in range(4 * Sink.DEPTH):
                sink.write(bytes(1 << 16))
        assert caught.value.errno == errno.ENOSPC
        assert not sink.thread.is_alive()


@pytest.mark.parametrize("extra", [(), ("--dtype", "bf16")])
def test_a_failed_write_in_the_sink_is_one_clean_error_and_leaves_nothing(
    seeded_resnet18, tmp_path, monkeypatch, extra
):
    """ENOSPC from the sink thread's pwrite (raw ranges are copied by the kernel, so the cast
    pieces and a tensor handed whole go through it): one line, no output, no temporary file."""
    src = tmp_path / "in.safetensors"
    shutil.copyfile(seeded_resnet18.safetensors, src)
    before = src.read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real = os.pwrite
    calls = {"n": 0}

    def fills_up(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fills_up)
    monkeypatch.setattr(os, "copy_file_range", lambda *a: _enospc(), raising=False)
    monkeypatch.setattr(os, "sendfile", lambda *a: _enospc())
    run = run_cli("convert", src, "-o", out_dir / "o.safetensors", *extra)
    assert_clean_error(run, out_dir / "o.safetensors", contains="No space left", code=1)
    assert os.listdir(out_dir) == []
    assert src.read_bytes() == before


def _enospc():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


LIMITED = """
import resource, subprocess, sys
limit = int(sys.argv[1])
def pre():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: EFBIG
p = subprocess.run([sys.executable, "-m", "surgery", *sys.argv[2:]], preexec_fn=pre, capture_output=True, text=True)
sys.stderr.write(p.stderr)
sys.exit(p.returncode)
"""


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--dtype", "bf16"), ("--dtype", "fp16")])
def test_a_file_size_limit_mid_write_is_one_clean_error(seeded_resnet18, tmp_path, extra):
    """A real failed write, from the kernel (EFBIG past RLIMIT_FSIZE): in the kernel's range
    copy or in the sink thread's pwrite of numpy-cast pieces."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", LIMITED, "4000000", "convert", seeded_resnet18.safetensors, "-o", out, *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    run = Run(proc.returncode, "", proc.stderr)
    assert_clean_error(run, out, contains="cannot write", code=1)
    assert "too large" in run.stderr.lower()
    assert os.listdir(out_dir) == []
