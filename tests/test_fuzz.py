"""Damaged input of every format ends in a result or a `SurgeryError`, never anything else.

Valid checkpoints are mutated, truncated and spliced four ways:

(a) raw bytes of the whole file (every format, sharded folders included);
(b) only the data.pkl of torch zip and TorchScript archives, the zip rebuilt
    around it, so the pickle machine is fuzzed and not the zip reader; and
    tensor records (storage, offset, size, stride, dtype) written from scratch
    with absurd numbers, in zip and legacy files;
(c) only the JSON header of safetensors files (length fixed up), as text and as
    structure, plus headers generated from scratch;
(d) only the pickles of legacy files, the storage section left as it was;
(e) names: hostile tensor names (NUL, escape codes, newlines, lone surrogates,
    bidi overrides) in torch and safetensors files, and hostile shard names in
    indexes and DCP metadata: NUL bytes, paths out of the folder, links out of
    it or in a loop, FIFOs, an index naming itself or another index.

When `open_checkpoint` returns, everything a caller does next must work too:
the listing, the findings, the JSON and text reports (every name printed
escaped, the JSON ASCII), and `state_dict()` (a result or a `SurgeryError`). A watchdog turns a hang into a failure, and
the fixtures must be byte-identical after all of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import shutil
import signal
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FIXTURES, examples, torch_save_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import surgery
from surgery.commands.inspect import InspectReport
from surgery.render import rows
from surgery.render.json import dumps
from surgery.render.reports import page_of

pytestmark = pytest.mark.slow  # hundreds of generated files per test

WATCHDOG_SECONDS = 20
# Examples per fuzz test: 300 under the "ci" profile (the kinds with costlier inputs run a half or a
# third of it). A longer campaign: SURGERY_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py
EXAMPLES = int(os.environ.get("SURGERY_FUZZ_EXAMPLES") or examples(300))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


FIXTURES_DIGEST = _tree_digest(FIXTURES)  # taken before any test of this module runs


# -- the seeds -----------------------------------------------------------------
def _fixture_files() -> dict[str, bytes]:
    out = {}
    for path in sorted(FIXTURES.rglob("*")):
        if path.is_file() and path.suffix != ".py" and not path.name.endswith(".json"):
            out[str(path.relative_to(FIXTURES))] = path.read_bytes()
    return out


@cache
def _generated() -> dict[str, bytes]:
    """Small checkpoints with what the fixtures lack: views, Parameters, conj bits, FRAMEs."""
    torch.manual_seed(0)
    big = torch.randn(6, 4)
    views = {"a": big[1:3], "b": big.t(), "c": big[:, 1], "e": torch.randn(2).expand(3, 2), "s": big[0, 0]}
    params = {
        "p": torch.nn.Parameter(torch.randn(2, 2)),
        "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
        "g": torch.randn(3).requires_grad_(),
    }
    dtypes = {
        "c": torch.randn(2, dtype=torch.complex64).conj(),
        "n": torch._neg_view(torch.randn(2, dtype=torch.complex64)),
        "bf": torch.randn(3).bfloat16(),
        "b": torch.tensor([True, False]),
        "z": torch.zeros(0, 2),
        "i": torch.tensor(5),
    }
    new = {"u16": torch.arange(3).to(torch.uint16), "f8": torch.randn(3).to(torch.float8_e5m2)}
    legacy = {"_use_new_zipfile_serialization": False}
    return {
        "gen/views.pth": torch_save_bytes(views),
        "gen/params-p4.pth": torch_save_bytes(params, pickle_protocol=4),
        "gen/dtypes-p5.pth": torch_save_bytes({**dtypes, **new}, pickle_protocol=5),
        "gen/views-legacy.pth": torch_save_bytes(views, **legacy),
        "gen/params-legacy.pth": torch_save_bytes(params, **legacy),
        "gen/dtypes-legacy-p4.pth": torch_save_bytes(dtypes, pickle_protocol=4, **legacy),
        "gen/nested-legacy.pth": torch_save_bytes(
            {"state_dict": views, "epoch": 2, "opt": [1.5, None]}, **legacy
        ),
    }


PLAIN_PICKLES = {
    f"plain/p{protocol}.pkl": pickle.dumps(
        {"epoch": 3, "lr": 0.5, "names": ["a", "b"], "blob": b"\x00\x01", "t": (1, (2, 3)), "s": {1, 2}},
        protocol=protocol,
    )
    for protocol in range(6)
}


@cache
def seeds() -> dict[str, bytes]:
    return {**_fixture_files(), **_generated(), **PLAIN_PICKLES}


def _kind(data: bytes) -> str:
    if data.startswith(b"PK"):
        return "zip"
    if data[:1] == b"\x80" and b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19" in data[:32]:
        return "legacy"
    if data[8:9] == b"{":
        return "safetensors"
    return "pickle"


def seeds_of(kind: str) -> list[str]:
    return [name for name, data in seeds().items() if _kind(data) == kind]


SHARDED_FOLDERS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir() and list(p.glob("*.index.json")))


# -- running one input ----------------------------------------------------------
class Hang(BaseException):
    """Raised by the watchdog; a BaseException so no `except Exception` in surgery can hide it."""


@contextmanager
def watchdog(seconds: int = WATCHDOG_SECONDS) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no result after {seconds} s: surgery hangs on this input")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    except Hang as exc:  # an ordinary failure, so hypothesis reports the input
        raise AssertionError(str(exc)) from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per example: earlier mappings never see a file rewritten under them."""
    folder = Path(tempfile.mkdtemp(prefix="surgery-fuzz-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def storage_bytes(t: torch.Tensor) -> bytes:
    """The bytes under `t`, copied as bytes only (no kernel ever sees unaligned data)."""
    src = t.detach().untyped_storage()
    copy = torch.UntypedStorage(src.nbytes())
    copy.copy_(src)
    return bytes(torch.empty(0, dtype=torch.uint8).set_(copy).numpy().tobytes())


def exercise(path: Path) -> surgery.Checkpoint | surgery.SurgeryError:
    """Open `path` and use the result the way the CLI and scripts do."""
    try:
        ckpt = surgery.open_checkpoint(path)
    except surgery.SurgeryError as exc:
        assert isinstance(exc.message, str) and str(exc)
        return exc
    inspected = InspectReport(ckpt)
    assert dumps(inspected.to_json()).isascii()
    text = rows.plain(page_of(inspected))
    assert all(c.isprintable() or c == "\n" for c in text), "a name reaches the terminal unescaped"
    repr(ckpt)
    assert isinstance(ckpt.safe, bool)
    assert ckpt.num_params >= 0 and ckpt.nbytes >= 0
    infos = {}
    for info in ckpt.tensors:
        json.dumps(info.to_json())
        assert all(type(d) is int and d >= 0 for d in info.shape), info
        assert info.numel == math.prod(info.shape), info
        infos[info.name] = info
    for finding in ckpt.findings:
        json.dumps(finding.to_json())
        str(finding)
    for extra in ckpt.extras:
        json.dumps(extra.to_json())
    try:
        tensors = ckpt.state_dict()
    except surgery.SurgeryError:
        return ckpt
    assert list(tensors) == list(infos)
    for name, t in tensors.items():
        info = infos[name]
        assert isinstance(t, torch.Tensor), name
        assert tuple(t.shape) == info.shape, name
        assert str(t.dtype).removeprefix("torch.") == info.dtype, name
        storage_bytes(t)  # every byte a tensor reaches is really there
    if tensors:
        first = next(iter(tensors))
        one = ckpt.tensor(first)
        assert one.shape == tensors[first].shape and one.stride() == tensors[first].stride()
    return ckpt


def check_file(
    data: bytes, name: str = "input.pth", then: Callable[[surgery.Checkpoint], Any] | None = None
) -> surgery.Checkpoint | surgery.SurgeryError:
    """Write `data` to a scratch file, exercise it, and run `then` while the file exists."""
    with scratch() as folder:
        path = folder / Path(name).name
        path.write_bytes(data)
        with watchdog():
            ckpt = exercise(path)
            if then is not None:
                assert isinstance(ckpt, surgery.Checkpoint), f"a well-formed file is refused: {ckpt}"
                then(ckpt)
        assert sorted(p.name for p in folder.iterdir()) == [path.name], "surgery wrote beside its input"
        assert path.read_bytes() == data, "surgery changed its input"
        return ckpt


# -- byte-level mutations ------------------------------------------------------------
INTERESTING_INTS = st.sampled_from(
    [0, 1, -1, 2, 3, 4, 7, 8, 15, 16, 63, 64, 127, 128, 255, 256, 1000, 2**15, 2**16 - 1, 2**16]
    + [2**31 - 1, -(2**31), 2**32 - 1, 2**32, 2**53, 2**62, 2**63 - 1, 2**63, -(2**63), 2**64 - 1]
    + [2**64, 2**64 + 1, 10**30, -(10**30)]
) | st.integers(min_value=-(2**70), max_value=2**70)

positions = st.integers(min_value=0, max_value=1 << 24)
byte_ops = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("set"), positions, st.integers(0, 255)),
    st.tuples(st.just("overwrite"), positions, st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("delete"), positions, st.integers(1, 512)),
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("number"), positions, st.sampled_from([1, 2, 4, 8]), INTERESTING_INTS),
    st.tuples(
        st.just("splice"), positions, st.integers(0, 1000), positions, st.integers(1, 4096), st.booleans()
    ),
)


def apply_byte_ops(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    donors = list(seeds().values())
    for op in ops:
        kind, pos = op[0], op[1]
        if kind in ("insert", "truncate", "splice"):
            pos %= len(buf) + 1
        elif not buf:
            continue
        else:
            pos %= len(buf)
        if kind == "flip":
            buf[pos] ^= 1 << op[2]
        elif kind == "set":
            buf[pos] = op[2]
        elif kind == "overwrite":
            buf[pos : pos + len(op[2])] = op[2]
        elif kind == "insert":
            buf[pos:pos] = op[2]
        elif kind == "delete":
            del buf[pos : pos + op[2]]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "number":
            width, value = op[2], op[3]
            raw = (value % (1 << (8 * width))).to_bytes(width, "little")
            buf[pos : pos + width] = raw
        elif kind == "splice":
            donor = donors[op[2] % len(donors)]
            start = op[3] % (len(donor) + 1)
            chunk = donor[start : start + op[4]]
            if op[5]:
                buf[pos:pos] = chunk
            else:
                buf[pos : pos + len(chunk)] = chunk
    return bytes(buf)


# -- pickle-level mutations ----------------------------------------------------------
def encode_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    size = (value.bit_length() + 8) // 8
    return b"\x8a" + bytes([size]) + value.to_bytes(size, "little", signed=True)


def encode_str(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def encode_global(qualname: str) -> bytes:
    module, _, name = qualname.rpartition(".")
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


GLOBALS = [
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_wrapper_subclass",
    "torch._tensor._rebuild_from_type_v2",
    "torch.nn.parameter.Parameter",
    "torch.Tensor",
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.DoubleStorage",
    "torch.BoolStorage",
    "torch.ComplexDoubleStorage",
    "torch.QInt8Storage",
    "torch.UntypedStorage",
    "torch.cuda.FloatStorage",
    "torch.float8_e4m3fn",
    "torch.float4_e2m1fn_x2",
    "torch.complex32",
    "torch.uint64",
    "torch.qint8",
    "torch.bfloat16",
    "torch.Size",
    "torch.device",
    "torch.serialization._get_layout",
    "torch.per_tensor_affine",
    "collections.OrderedDict",
    "collections.Counter",
    "builtins.set",
    "builtins.bytearray",
    "builtins.complex",
    "_codecs.encode",
    "torch.jit._pickle.build_intlist",
    "torch.jit._pickle.restore_type_tag",
    "__torch__.Module",
    "os.system",
    "builtins.getattr",
    "torch.storage._load_from_bytes",
]
STRINGS = [
    "storage",
    "module",
    "0",
    "1",
    "cpu",
    "cuda:0",
    "meta",
    "little",
    "big",
    "conj",
    "neg",
    "_parameters",
    "_buffers",
    "_modules",
    "state_dict",
    "weight",
    "",
    "\udc80",
    "\x00",
    "w\x1b[2J\x1b[H",
    "a\nb",
    "\u202eweight",
]
SINGLE_OPCODES = [
    bytes([code]) for code in b"(.012NQR]}ablsutehq\x85\x86\x87\x88\x89\x8f\x90\x91\x93\x94\x95\x97\x98"
]
SINGLE_OPCODES += [b"h\x00", b"h\x01", b"q\x00", b"q\x05", b"j\xff\xff\xff\xff", b"\x95" + b"\xff" * 8]
SINGLE_OPCODES += [b"\x80\x02", b"\x80\x06", b"(t", b")", b"}q\x00", b"\x8c\x00", b"B\xff\xff\xff\x7f"]

snippets = st.one_of(
    INTERESTING_INTS.map(encode_int),
    (st.sampled_from(STRINGS) | st.text(max_size=12)).map(encode_str),
    st.sampled_from(GLOBALS).map(encode_global),
    st.sampled_from(SINGLE_OPCODES),
)
indexes = st.integers(min_value=0, max_value=1 << 16)
pickle_ops = st.one_of(
    # wrong numbers and names in an intact structure: where the tensor checks are
    st.tuples(st.just("int"), indexes, INTERESTING_INTS),
    st.tuples(st.just("int"), indexes, INTERESTING_INTS),
    st.tuples(st.just("text"), indexes, st.sampled_from(STRINGS) | st.text(max_size=12)),
    st.tuples(st.just("drop"), indexes),
    st.tuples(st.just("dup"), indexes),
    st.tuples(st.just("swap"), indexes, indexes),
    st.tuples(st.just("replace"), indexes, snippets),
    st.tuples(st.just("insert"), indexes, snippets),
    st.tuples(st.just("opcode"), indexes, st.integers(0, 255)),
)


def opcode_chunks(pkl: bytes) -> list[bytes]:
    """The pickle split at opcode boundaries (what follows STOP stays one chunk)."""
    starts = [pos for _, _, pos in pickletools.genops(pkl)]
    end = pkl.index(b".", starts[-1]) + 1
    bounds = [*starts, end]
    chunks = [pkl[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    if end < len(pkl):
        chunks.append(pkl[end:])
    return chunks


INT_OPCODES = frozenset(b"KMJ\x8a\x8bIL")
TEXT_OPCODES = frozenset(b"X\x8c\x8dVUTS")


def apply_pickle_ops(pkl: bytes, ops: list[tuple], raw: list[tuple]) -> bytes:
    chunks = opcode_chunks(pkl)
    for op in ops:
        if not chunks:
            break
        i = op[1] % len(chunks)
        if op[0] in ("int", "text"):
            wanted = INT_OPCODES if op[0] == "int" else TEXT_OPCODES
            targets = [k for k, chunk in enumerate(chunks) if chunk[0] in wanted]
            if targets:
                k = targets[op[1] % len(targets)]
                chunks[k] = encode_int(op[2]) if op[0] == "int" else encode_str(op[2])
        elif op[0] == "drop":
            del chunks[i]
        elif op[0] == "dup":
            chunks.insert(i, chunks[i])
        elif op[0] == "swap":
            j = op[2] % len(chunks)
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif op[0] == "replace":
            chunks[i] = op[2]
        elif op[0] == "insert":
            chunks.insert(i, op[2])
        elif op[0] == "opcode":
            chunks[i] = bytes([op[2]]) + chunks[i][1:]
    return apply_byte_ops(b"".join(chunks), raw)


# -- (a) raw bytes of whole files ------------------------------------------------------
@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "pickle"])
@FUZZ
@given(data=st.data(), ops=st.lists(byte_ops, min_size=1, max_size=4))
def test_raw_mutations(kind, data, ops):
    name = data.draw(st.sampled_from(seeds_of(kind)), label="seed")
    check_file(apply_byte_ops(seeds()[name], ops), name)


@settings(FUZZ, max_examples=EXAMPLES // 2)
@given(
    folder=st.sampled_from(SHARDED_FOLDERS),
    member=st.integers(0, 2),
    ops=st.lists(byte_ops, min_size=1, max_size=3),
    open_index=st.booleans(),
)
def test_sharded_mutations(folder, member, ops, open_index):
    source = FIXTURES / folder
    files = sorted(p.name for p in source.iterdir())
    target = files[member % len(files)]
    with scratch() as tmp:
        copy = tmp / folder
        shutil.copytree(source, copy)
        (copy / target).write_bytes(apply_byte_ops((source / target).read_bytes(), ops))
        before = sorted(p.name for p in copy.iterdir())
        opened = next(copy.glob("*.index.json"), copy) if open_index else copy
        with watchdog():
            exercise(opened)
        assert sorted(p.name for p in copy.iterdir()) == before, "surgery wrote beside its input"


# -- (b) data.pkl of zip archives only ----------------------------------------------------
@cache
def zip_members(name: str) -> tuple[str, list[tuple[str, bytes]]]:
    with zipfile.ZipFile(io.BytesIO(seeds()[name])) as zf:
        members = [(info.filename, zf.read(info)) for info in zf.infolist()]
    pkl = next(n for n, _ in members if n.endswith("/data.pkl") and n.count("/") == 1)
    return pkl, members


def rebuild_zip(name: str, new_pkl: bytes) -> bytes:
    pkl_name, members = zip_members(name)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for member, body in members:
            zf.writestr(
                zipfile.ZipInfo(member, (2020, 1, 1, 0, 0, 0)), new_pkl if member == pkl_name else body
            )
    return out.getvalue()


@FUZZ
@given(
    name=st.sampled_from(seeds_of("zip")),
    ops=st.lists(pickle_ops, max_size=4),
    raw=st.lists(byte_ops, max_size=2),
)
def test_zip_data_pkl_mutations(name, ops, raw):
    pkl_name, members = zip_members(name)
    pkl = dict(members)[pkl_name]
    check_file(rebuild_zip(name, apply_pickle_ops(pkl, ops, raw)), name)


def test_rebuilt_zips_are_still_read():
    """The rebuilding itself keeps every zip seed readable, so (b) fuzzes only data.pkl."""
    for name in seeds_of("zip"):
        pkl_name, members = zip_members(name)
        ckpt = check_file(rebuild_zip(name, dict(members)[pkl_name]), name)
        assert isinstance(ckpt, surgery.Checkpoint) and ckpt.tensors, name


# -- (b') tensor records written from scratch, with wrong numbers ----------------------------
STORAGE_TYPES = [
    "FloatStorage",
    "DoubleStorage",
    "HalfStorage",
    "BFloat16Storage",
    "LongStorage",
    "IntStorage",
    "ByteStorage",
    "BoolStorage",
    "ComplexFloatStorage",
    "ComplexDoubleStorage",
    "QInt8Storage",
    "QUInt4x2Storage",
    "UntypedStorage",
]
TENSOR_DTYPES = [
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int16",
    "uint8",
    "bool",
    "complex64",
    "complex128",
    "complex32",
    "uint16",
    "uint64",
    "float8_e4m3fn",
    "float4_e2m1fn_x2",
    "qint8",
]
dim_ints = st.integers(0, 6) | st.sampled_from(
    [0, 1, 2**31 - 1, 2**31, 2**32, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1, -1]
)


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


EMPTY_ORDERED_DICT = encode_global("collections.OrderedDict") + b")R"


@st.composite
def tensor_record(draw, keys: list[str]) -> bytes:
    """One tensor as torch pickles it, every number drawn, some of them absurd."""
    key = draw(st.sampled_from([*keys, "missing"]), label="storage key")
    pid = [
        encode_str("storage"),
        encode_global("torch." + draw(st.sampled_from(STORAGE_TYPES), label="storage type")),
        encode_str(key),
        encode_str(draw(st.sampled_from(["cpu", "cuda:0", "meta", "mps"]))),
        encode_int(draw(dim_ints, label="storage numel")),
    ]
    if draw(st.booleans(), label="legacy storage view"):
        pid.append(_tuple([encode_str(key), encode_int(draw(dim_ints)), encode_int(draw(dim_ints))]))
    ndim = draw(st.integers(0, 4), label="dims")
    size = draw(st.lists(dim_ints, min_size=ndim, max_size=ndim), label="size")
    stride = draw(st.lists(dim_ints, min_size=ndim, max_size=ndim), label="stride")
    if draw(st.integers(0, 9)) == 0:
        stride = stride[:-1]  # a dimension short
    args = [
        _tuple(pid) + b"Q",
        encode_int(draw(dim_ints, label="storage offset")),
        _tuple([encode_int(d) for d in size]),
        _tuple([encode_int(d) for d in stride]),
        b"\x88" if draw(st.booleans(), label="requires_grad") else b"\x89",
        EMPTY_ORDERED_DICT,
    ]
    if draw(st.booleans(), label="v3"):
        fn = "torch._utils._rebuild_tensor_v3"
        args.append(encode_global("torch." + draw(st.sampled_from(TENSOR_DTYPES), label="dtype")))
    else:
        fn = "torch._utils._rebuild_tensor_v2"
    if draw(st.integers(0, 5)) == 0:
        args.append(b"}" + encode_str(draw(st.sampled_from(["conj", "neg", "other"]))) + b"\x88s")
    tensor = encode_global(fn) + _tuple(args) + b"R"
    if draw(st.booleans(), label="Parameter"):
        grad = b"\x88" if draw(st.booleans()) else b"\x89"
        tensor = (
            encode_global("torch._utils._rebuild_parameter")
            + _tuple([tensor, grad, EMPTY_ORDERED_DICT])
            + b"R"
        )
    return tensor


@st.composite
def scratch_checkpoints(draw) -> bytes:
    """A torch zip or legacy file around tensor records drawn from scratch."""
    storages = draw(
        st.dictionaries(st.sampled_from(["0", "1", "2"]), st.binary(max_size=48), min_size=1, max_size=3),
        label="storage bytes",
    )
    keys = sorted(storages)
    count = draw(st.integers(1, 4), label="tensors")
    body = b"".join(encode_str(f"t{i}") + draw(tensor_record(keys)) for i in range(count))
    pkl = b"\x80\x02}(" + body + b"u."
    if draw(st.booleans(), label="zip"):
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr("archive/data.pkl", pkl)
            zf.writestr("archive/byteorder", "little")
            for key, blob in storages.items():
                zf.writestr(f"archive/data/{key}", blob)
            zf.writestr("archive/version", "3\n")
        return out.getvalue()
    sys_info = {
        "protocol_version": 1001,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
    }
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, 2), pickle.dumps(1001, 2), pickle.dumps(sys_info, 2), pkl]
    parts.append(pickle.dumps(keys, 2))
    for key in keys:
        blob = storages[key]
        declared = draw(st.integers(0, 64) | st.sampled_from([2**63, 2**64 - 1]), label=f"count of {key}")
        parts.append(declared.to_bytes(8, "little") + blob)
    return b"".join(parts)


@FUZZ
@given(data=scratch_checkpoints())
def test_tensor_records_from_scratch(data):
    check_file(data, "scratch.pth")


# -- (c) safetensors headers ---------------------------------------------------------------
@cache
def safetensors_parts(name: str) -> tuple[bytes, bytes]:
    data = seeds()[name]
    n = int.from_bytes(data[:8], "little")
    return data[8 : 8 + n], data[8 + n :]


def safetensors_file(header: bytes, body: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + body


JSON_BYTES = st.sampled_from(b'0123456789-+.eE[]{},:" \\abtnruflsF').map(lambda c: bytes([c]))
json_chunks = st.lists(JSON_BYTES, min_size=1, max_size=8).map(b"".join) | st.sampled_from(
    [
        b"-1",
        b"1e400",
        b"18446744073709551616",
        b"9223372036854775807",
        b"0.5",
        b"null",
        b'"F32"',
        b"[]",
        b"{}",
    ]
)
header_text_ops = st.one_of(
    st.tuples(st.just("overwrite"), positions, json_chunks),
    st.tuples(st.just("insert"), positions, json_chunks),
    st.tuples(st.just("delete"), positions, st.integers(1, 16)),
    st.tuples(st.just("truncate"), positions),
    byte_ops,
)


@FUZZ
@given(name=st.sampled_from(seeds_of("safetensors")), ops=st.lists(header_text_ops, min_size=1, max_size=4))
def test_safetensors_header_text_mutations(name, ops):
    header, body = safetensors_parts(name)
    check_file(safetensors_file(apply_byte_ops(header, ops), body), name)


DTYPE_CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "C64"]
DTYPE_CODES += ["U16", "U32", "U64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"]
DTYPE_CODES += ["F4", "F6_E2M3", "F6_E3M2"]
json_scalars = (
    st.none()
    | st.booleans()
    | INTERESTING_INTS
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(DTYPE_CODES)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
small_ints = st.integers(0, 6) | INTERESTING_INTS
field_values = {
    "dtype": st.sampled_from(DTYPE_CODES) | json_values,
    "shape": st.lists(small_ints, max_size=4) | json_values,
    "data_offsets": st.lists(small_ints, min_size=2, max_size=2) | json_values,
}
header_ops = st.one_of(
    *(st.tuples(st.just("set"), indexes, st.just(field), values) for field, values in field_values.items()),
    st.tuples(st.just("extra"), indexes, st.text(max_size=6), json_values),
    st.tuples(st.just("drop-field"), indexes, st.sampled_from(list(field_values))),
    st.tuples(st.just("drop-tensor"), indexes),
    st.tuples(st.just("copy-tensor"), indexes, st.text(max_size=6)),
    st.tuples(st.just("replace-tensor"), indexes, json_values),
    st.tuples(st.just("shift"), indexes, st.integers(-9, 9)),
    st.tuples(st.just("metadata"), json_values),
    st.tuples(st.just("body"), st.integers(-64, 64)),
)


def apply_header_ops(header: dict, body: bytes, ops: list[tuple]) -> tuple[dict, bytes]:
    header = json.loads(json.dumps(header))
    for op in ops:
        names = [k for k in header if k != "__metadata__"]
        kind = op[0]
        if kind == "metadata":
            header["__metadata__"] = op[1]
            continue
        if kind == "body":
            body = body[: len(body) + op[1]] if op[1] < 0 else body + b"\x5a" * op[1]
            continue
        if not names:
            continue
        name = names[op[1] % len(names)]
        spec = header[name]
        if kind in ("set", "extra") and isinstance(spec, dict):
            spec[op[2]] = op[3]
        elif kind == "drop-field" and isinstance(spec, dict):
            spec.pop(op[2], None)
        elif kind == "drop-tensor":
            del header[name]
        elif kind == "copy-tensor":
            header[name + op[2] + "_copy"] = json.loads(json.dumps(spec))
        elif kind == "replace-tensor":
            header[name] = op[2]
        elif kind == "shift" and isinstance(spec, dict) and isinstance(spec.get("data_offsets"), list):
            spec["data_offsets"] = [o + op[2] if type(o) is int else o for o in spec["data_offsets"]]
    return header, body


@FUZZ
@given(
    name=st.sampled_from(seeds_of("safetensors")),
    ops=st.lists(header_ops, min_size=1, max_size=4),
    pad=st.integers(0, 9),
)
def test_safetensors_header_structure_mutations(name, ops, pad):
    header, body = safetensors_parts(name)
    new_header, new_body = apply_header_ops(json.loads(header), body, ops)
    text = json.dumps(new_header).encode() + b" " * pad
    check_file(safetensors_file(text, new_body), name)


@st.composite
def consistent_safetensors(draw) -> tuple[bytes, dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """A well-formed file from scratch: any dtypes, shapes, names and tensor order."""
    from surgery.dtypes import BY_SAFETENSORS, SAFETENSORS_EXTRA_BITS

    bits = {**{c: d.bits for c, d in BY_SAFETENSORS.items()}, **SAFETENSORS_EXTRA_BITS}
    names = draw(st.lists(st.text(min_size=1, max_size=8), max_size=6, unique=True), label="names")
    layout = draw(st.permutations(names), label="order in the data")
    specs, body, expected = {}, b"", {}
    for name in layout:
        code = draw(st.sampled_from(sorted(bits)), label=f"dtype of {name!r}")
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3), label=f"shape of {name!r}"))
        size = (math.prod(shape) * bits[code] + 7) // 8
        blob = draw(st.binary(min_size=size, max_size=size))
        specs[name] = {"dtype": code, "shape": list(shape), "data_offsets": [len(body), len(body) + size]}
        expected[name] = (code, shape, blob)
        body += blob
    if draw(st.booleans(), label="with metadata"):
        specs["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    order = draw(st.permutations(list(specs)), label="order in the header")
    text = json.dumps({k: specs[k] for k in order}).encode()
    text += b" " * draw(st.integers(0, 7))
    return safetensors_file(text, body), expected


@FUZZ
@given(case=consistent_safetensors())
def test_generated_safetensors_are_read_exactly(case):
    data, expected = case

    def check(ckpt: surgery.Checkpoint) -> None:
        assert ckpt.format == "safetensors" and ckpt.safe
        assert {t.name for t in ckpt.tensors} == set(expected)
        for info in ckpt.tensors:
            _, shape, blob = expected[info.name]
            assert info.shape == shape
            if info.note:  # F4, F6: listed, not rebuilt
                with pytest.raises(surgery.UnsupportedTensor):
                    ckpt.tensor(info.name)
                continue
            t = ckpt.tensor(info.name)
            assert tuple(t.shape) == shape and t.is_contiguous()
            start = t.storage_offset() * t.element_size()
            assert storage_bytes(t)[start : start + len(blob)] == blob

    check_file(data, "generated.safetensors", then=check)


@FUZZ
@given(case=consistent_safetensors())
def test_generated_safetensors_give_aligned_tensors(case):
    """torch allocates every tensor aligned and its kernels rely on it: a misaligned
    complex128 tensor crashes the process. The safetensors format does not align
    the data (the header's length is free), so the reader must."""
    data, _ = case

    def check(ckpt: surgery.Checkpoint) -> None:
        for info in ckpt.tensors:
            if info.note or not info.numel:
                continue
            t = ckpt.tensor(info.name)
            assert t.data_ptr() % t.element_size() == 0, (
                f"{info.name!r}: {t.dtype} data at address {t.data_ptr():#x}, "
                f"not aligned to {t.element_size()} bytes"
            )

    check_file(data, "generated.safetensors", then=check)


@FUZZ
@given(
    case=consistent_safetensors(),
    ops=st.lists(header_ops, min_size=1, max_size=3),
)
def test_generated_safetensors_with_wrong_numbers(case, ops):
    data, _ = case
    header, body = safetensors_parts_of(data)
    new_header, new_body = apply_header_ops(json.loads(header), body, ops)
    check_file(safetensors_file(json.dumps(new_header).encode(), new_body), "generated.safetensors")


def safetensors_parts_of(data: bytes) -> tuple[bytes, bytes]:
    n = int.from_bytes(data[:8], "little")
    return data[8 : 8 + n], data[8 + n :]


@FUZZ
@given(
    header=json_values | st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    body=st.binary(max_size=64),
)
def test_random_json_headers(header, body):
    check_file(safetensors_file(json.dumps(header).encode(), body), "random.safetensors")


# -- (d) the pickles of legacy files ------------------------------------------------------------
@cache
def legacy_parts(name: str) -> tuple[list[bytes], bytes]:
    """The five pickles (magic, version, sys info, object, storage keys) and the storage section."""
    data = seeds()[name]
    pickles, pos = [], 0
    for _ in range(5):
        stream = io.BytesIO(data)
        stream.seek(pos)
        for _op in pickletools.genops(stream):
            pass
        pickles.append(data[pos : stream.tell()])
        pos = stream.tell()
    return pickles, data[pos:]


@FUZZ
@given(
    name=st.sampled_from(seeds_of("legacy")),
    which=st.sampled_from([3, 3, 3, 4, 2, 1, 0]),
    ops=st.lists(pickle_ops, max_size=4),
    raw=st.lists(byte_ops, max_size=2),
)
def test_legacy_pickle_mutations(name, which, ops, raw):
    pickles, storages = legacy_parts(name)
    pickles = list(pickles)
    pickles[which] = apply_pickle_ops(pickles[which], ops, raw)
    check_file(b"".join(pickles) + storages, name)


def test_legacy_seeds_split_and_rejoin():
    for name in seeds_of("legacy"):
        pickles, storages = legacy_parts(name)
        assert b"".join(pickles) + storages == seeds()[name]
        ckpt = check_file(seeds()[name], name)
        assert isinstance(ckpt, surgery.Checkpoint) and ckpt.format == "torch-legacy" and ckpt.tensors, name


# -- (e) hostile names ---------------------------------------------------------------------------
HOSTILE_PARTS = ["\x00", "\x1b[2J", "\x1b]8;;x\x07", "\n", "\r", "\x7f", "\x9b", "\ud800", "\udfff"]
HOSTILE_PARTS += ["\u202e", "\u200b", "\ufeff", "/", "..", "\\", ".", "编码"]
hostile_names = st.lists(st.sampled_from(HOSTILE_PARTS) | st.text(max_size=3), min_size=1, max_size=4).map(
    "".join
)


@FUZZ
@given(names=st.lists(hostile_names, min_size=1, max_size=4, unique=True), zip_format=st.booleans())
def test_hostile_tensor_names(names, zip_format):
    state = {name: torch.full((2,), float(i)) for i, name in enumerate(names)}
    if zip_format:
        check_file(torch_save_bytes(state), "names.pth")
        return
    specs = {
        name: {"dtype": "F32", "shape": [2], "data_offsets": [8 * i, 8 * i + 8]}
        for i, name in enumerate(names)
    }
    body = b"".join(storage_bytes(t) for t in state.values())
    check_file(safetensors_file(json.dumps(specs).encode(), body), "names.safetensors")


SHARD = FIXTURES / "sharded_safetensors" / "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
OTHER_INDEX = "other.index.json"
shard_names = (
    st.sampled_from(
        [
            SHARD.name,
            INDEX,  # the index itself
            OTHER_INDEX,  # an index naming the first
            "pipe.safetensors",  # a FIFO
            "out.safetensors",  # a link out of the folder
            "loop.safetensors",  # a link to itself
            "self.safetensors",  # a link to the index
            "sub",  # a folder
            ".",
            "",
            "../outside.safetensors",
            "sub/../" + SHARD.name,
            "/etc/passwd",
            "/dev/zero",
        ]
    )
    | hostile_names
)


def hostile_folder(folder: Path, weight_map: dict[str, str] | None) -> Path:
    """A folder with one real shard, an index with `weight_map` (None: no index), and every
    trap a name may point at."""
    folder.mkdir()
    shutil.copyfile(SHARD, folder / SHARD.name)
    (folder.parent / "outside.safetensors").write_bytes(SHARD.read_bytes())
    if weight_map is not None:
        (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (folder / OTHER_INDEX).write_text(json.dumps({"weight_map": {"x": INDEX}}))
    os.mkfifo(folder / "pipe.safetensors")
    (folder / "out.safetensors").symlink_to("../outside.safetensors")
    (folder / "loop.safetensors").symlink_to("loop.safetensors")
    (folder / "self.safetensors").symlink_to(INDEX)
    (folder / "sub").mkdir()
    return folder / INDEX


@settings(FUZZ, max_examples=EXAMPLES // 2)
@given(
    weight_map=st.dictionaries(
        st.sampled_from(["fc.weight", "fc.bias", "x", "\x1b[2J"]), shard_names, min_size=1
    ),
    open_index=st.booleans(),
)
def test_hostile_shard_names(weight_map, open_index):
    with scratch() as tmp:
        index = hostile_folder(tmp / "sharded", weight_map)
        before = sorted(p.name for p in tmp.rglob("*"))
        with watchdog():
            exercise(index if open_index else index.parent)
        assert sorted(p.name for p in tmp.rglob("*")) == before, "surgery wrote beside its input"


@cache
def dcp_metadata():
    return pickle.loads((FIXTURES / "dcp_sharded" / ".metadata").read_bytes())


@settings(FUZZ, max_examples=EXAMPLES // 2)
@given(file_names=st.lists(shard_names, min_size=1, max_size=3))
def test_hostile_dcp_file_names(file_names):
    import copy

    metadata = copy.deepcopy(dcp_metadata())
    for i, info in enumerate(metadata.storage_data.values()):
        info.relative_path = file_names[i % len(file_names)]
    with scratch() as tmp:
        folder = hostile_folder(tmp / "dcp", None).parent
        for distcp in (FIXTURES / "dcp_sharded").glob("*.distcp"):
            shutil.copyfile(distcp, folder / distcp.name)
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
        with watchdog():
            exercise(folder)


# -- the seeds themselves, and the fixtures after all of it -------------------------------
def test_every_seed_reads_cleanly():
    kinds = {_kind(data) for data in seeds().values()}
    assert kinds == {"zip", "legacy", "safetensors", "pickle"}
    for name, data in seeds().items():
        check_file(data, name)


def test_watchdog_turns_a_hang_into_a_failure():
    with pytest.raises(AssertionError, match="hangs"), watchdog(1):
        while True:
            pass


def test_fixtures_unchanged_after_fuzzing():
    assert _tree_digest(FIXTURES) == FIXTURES_DIGEST


# -- (e) conjugate/negative bits, strided and expanded views, deflated members: converted ----------
# These found crashes in convert and diff that reading alone never showed: each file is also
# converted (safetensors and torch) and diffed, and the values compared with torch.load's.
BIT_DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128, torch.int64, torch.bfloat16]


@st.composite
def bit_tensors(draw) -> torch.Tensor:
    """A small tensor as torch.save meets them: plain, conjugate, negative, strided, expanded."""
    dtype = draw(st.sampled_from(BIT_DTYPES), label="dtype")
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3), label="shape"))
    base = (torch.arange(math.prod(shape)) - 3).reshape(shape).to(dtype)
    if dtype.is_complex:
        base = base + 1j * base.flip(0)
    kind = draw(st.sampled_from(["plain", "conj", "neg", "transposed", "expanded", "sliced"]), label="view")
    if kind == "conj" and dtype.is_complex:
        return base.conj()
    if kind == "neg" and (dtype.is_complex or dtype.is_floating_point):
        return base.conj().imag if dtype.is_complex else torch._neg_view(base)
    if kind == "transposed" and len(shape) > 1:
        return base.transpose(0, -1)
    if kind == "expanded":
        return base[..., :1].expand(*shape[:-1], draw(st.integers(1, 6), label="repeats"))
    if kind == "sliced":
        return base[..., 1:]
    return base


@st.composite
def bit_checkpoints(draw) -> bytes:
    tensors = draw(st.lists(bit_tensors(), min_size=1, max_size=4), label="tensors")
    state = {f"t{i}": t for i, t in enumerate(tensors)}
    if draw(st.booleans(), label="a conjugate alias of t0") and tensors[0].is_complex():
        state["t0_conj"] = tensors[0].conj()
    raw = torch_save_bytes(state)
    if draw(st.booleans(), label="deflated"):
        raw = rezip_deflated(raw, storages_only=draw(st.booleans(), label="storages only"))
    return raw


def rezip_deflated(raw: bytes, *, storages_only: bool) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for info in src.infolist():
            copy = zipfile.ZipInfo(info.filename, (2020, 1, 1, 0, 0, 0))
            deflate = "/data/" in info.filename or not storages_only
            copy.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            zf.writestr(copy, src.read(info))
    return out.getvalue()


def converted_and_diffed(ckpt: surgery.Checkpoint) -> None:
    """Convert to safetensors and torch; both load equal to torch.load's values; diff agrees."""
    expected = torch.load(ckpt.path, weights_only=True)
    for out in (ckpt.path.with_name("o.safetensors"), ckpt.path.with_name("o.pt")):
        try:
            surgery.convert(ckpt.path, out, verify=True, max_output_ratio=1e6)
        except surgery.UsageError as exc:  # complex128 has no safetensors code
            assert out.suffix == ".safetensors" and "cannot store" in exc.message, exc
            continue
        back = surgery.open_checkpoint(out)
        for name, want in expected.items():
            got = back.tensor(name)
            assert got.dtype == want.dtype and torch.equal(got, want.resolve_conj().resolve_neg()), name
        assert surgery.diff(ckpt.path, out).same
        out.unlink()


@settings(FUZZ, max_examples=EXAMPLES // 3)
@given(data=bit_checkpoints())
def test_bits_views_and_deflated_members_convert_as_torch_loads(data):
    check_file(data, "bits.pth", then=converted_and_diffed)


# -- (f) deflated members, damaged: every command answers with a result or a SurgeryError ----------
def converts_or_refuses(path: Path) -> None:
    for out in (path.with_name("o.safetensors"), path.with_name("o.pt")):
        try:
            surgery.convert(path, out, trust=True)
        except surgery.SurgeryError:
            assert not out.exists()
        else:
            out.unlink()
    try:
        surgery.diff(path, path, trust=True)
    except surgery.SurgeryError as exc:
        assert exc.message


@settings(FUZZ, max_examples=EXAMPLES // 2)
@given(
    name=st.sampled_from(seeds_of("zip")),
    storages_only=st.booleans(),
    ops=st.lists(byte_ops, min_size=1, max_size=3),
)
def test_damaged_deflated_members(name, storages_only, ops):
    data = apply_byte_ops(rezip_deflated(seeds()[name], storages_only=storages_only), ops)
    with scratch() as folder:
        path = folder / "deflated.pth"
        path.write_bytes(data)
        with watchdog():
            exercise(path)
            converts_or_refuses(path)
        assert path.read_bytes() == data


# -- (g) views repeating a few stored bytes many times (stride 0), with absurd sizes ---------------
@st.composite
def repeating_views(draw) -> torch.Tensor:
    stored = draw(st.integers(1, 8), label="stored elements")
    shape, stride, reach = [], [], 0
    for _ in range(draw(st.integers(1, 4), label="dims")):
        if draw(st.booleans(), label="repeated dim"):
            shape.append(draw(st.integers(1, 2**20) | st.sampled_from([2**20, 2**30]), label="size"))
            stride.append(0)
        else:
            size = draw(st.integers(1, 3), label="size")
            step = draw(st.integers(0, 2), label="stride")
            if reach + (size - 1) * step >= stored:
                step = 0
            reach += (size - 1) * step
            shape.append(size)
            stride.append(step)
    while math.prod(shape) > 2**62:
        shape[shape.index(max(shape))] = 1
    return torch.arange(stored, dtype=torch.float32).as_strided(shape, stride)


@settings(FUZZ, max_examples=EXAMPLES // 3)
@given(a=repeating_views())
def test_repeating_views_are_inspected_converted_and_diffed_in_bounded_work(a):
    with scratch() as folder:
        pa, pb = folder / "a.pt", folder / "b.pt"
        torch.save({"w": a}, pa)
        torch.save({"w": a[..., :1].expand(a.shape)}, pb)  # repeats along the last dim as well
        with watchdog():
            ckpt = exercise(pa)
            assert isinstance(ckpt, surgery.Checkpoint) and ckpt.nbytes_out == a.numel() * 4
            for out in (folder / "o.safetensors", folder / "o.pt"):
                try:
                    surgery.convert(pa, out)  # the default --max-output-ratio bounds what is written
                except surgery.SurgeryError as exc:
                    assert "--max-output-ratio" in exc.message and not out.exists()
                else:
                    assert torch.equal(surgery.open_checkpoint(out).tensor("w"), a)
                    out.unlink()
            assert surgery.diff(pa, pa).same
            try:
                surgery.diff(pa, pb)
            except surgery.SurgeryError as exc:
                assert "comparing it would read" in exc.message
