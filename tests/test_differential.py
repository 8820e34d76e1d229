"""surgery against the reference readers: `torch.load` and `safetensors.torch.load_file`.

Whatever torch (or safetensors) reads from a file, surgery must report and
rebuild identically: the same tensor names in the same order, shapes, dtypes,
bit-identical bytes, strides, storage offsets, Parameter-ness, requires_grad and
the same pattern of shared storages. Checked on every fixture torch accepts, on
real torchvision architectures saved at test time in every format and pickle
protocol, and on hand-made checkpoints with the awkward cases (tied weights,
views, 0-dim, empty, exotic dtypes, conj bits).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file
from torch import nn

import surgery

# torch.load(weights_only=True) refuses these (TorchScript, pickled module,
# numpy scalars, os.system payload); every other fixture must load.
REFUSED = frozenset({"scripted.pt", "full_model.pth", "numpy_extras.pth", "payload_os_system.pth"})
TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin")

FILES = sorted(
    p.name for p in FIXTURES.iterdir() if p.is_file() and p.suffix in (*TORCH_SUFFIXES, ".safetensors")
)
TORCH_FILES = [n for n in FILES if not n.endswith(".safetensors")]
SAFETENSORS_FILES = [n for n in FILES if n.endswith(".safetensors")]
SHARDED = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir() and list(p.glob("*.index.json")))
ACCEPTED = [n for n in TORCH_FILES if n not in REFUSED]


# -- helpers -------------------------------------------------------------------
def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The logical values of `t` as flat bytes (conj/neg bits applied)."""
    t = rebuilt_aligned(t).resolve_conj().resolve_neg()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.contiguous().reshape(-1).view(torch.uint8)


def rebuilt_aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` over a fresh copy of its storage, the original read byte by byte only.

    Arithmetic on a tensor whose data is not aligned can crash the process
    (complex128 does), so values are compared on aligned copies and alignment
    is asserted on its own.
    """
    src = t.detach().untyped_storage()
    storage = torch.UntypedStorage(src.nbytes())
    storage.copy_(src)
    out = torch.empty(0, dtype=t.dtype).set_(storage, t.storage_offset(), t.size(), t.stride())
    if t.is_conj():
        out = out.conj()
    if t.is_neg():
        out = torch._neg_view(out)
    return out


def navigate(obj: Any, container: tuple[str, ...]) -> Any:
    for key in container:
        obj = obj[int(key)] if isinstance(obj, (list, tuple)) else obj[key]
    return obj


def flat_tensors(node: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors under `node` with dotted names, in insertion order."""
    if isinstance(node, torch.Tensor):
        return {prefix or "tensor": node}
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, (list, tuple)):
        items = list(enumerate(node))
    else:
        return {}
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        for name, t in flat_tensors(value, f"{prefix}.{key}" if prefix else str(key)).items():
            out.setdefault(name, t)
    return out


def storage_groups(tensors: dict[str, torch.Tensor]) -> set[frozenset[str]]:
    """Names grouped by the storage they live in (empty storages left out: no address)."""
    groups: dict[int, set[str]] = {}
    for name, t in tensors.items():
        storage = t.untyped_storage()
        if storage.nbytes() == 0:
            continue
        groups.setdefault(storage.data_ptr(), set()).add(name)
    return {frozenset(g) for g in groups.values()}


def assert_same_tensor(name: str, have: torch.Tensor, want: torch.Tensor) -> None:
    assert type(have) is type(want), f"{name}: {type(have).__name__} != {type(want).__name__}"
    assert have.dtype == want.dtype, f"{name}: dtype {have.dtype} != {want.dtype}"
    assert have.shape == want.shape, f"{name}: shape {tuple(have.shape)} != {tuple(want.shape)}"
    assert have.stride() == want.stride(), f"{name}: stride {have.stride()} != {want.stride()}"
    assert have.storage_offset() == want.storage_offset(), (
        f"{name}: storage offset {have.storage_offset()} != {want.storage_offset()}"
    )
    assert have.requires_grad == want.requires_grad, f"{name}: requires_grad differs"
    assert have.is_conj() == want.is_conj(), f"{name}: conj bit differs"
    assert have.is_neg() == want.is_neg(), f"{name}: neg bit differs"
    assert have.device.type == "cpu", f"{name}: on {have.device}"
    assert torch.equal(raw_bytes(have), raw_bytes(want)), f"{name}: bytes differ"
    # torch's own tensors are always aligned to their element size; kernels rely
    # on it (on a misaligned complex128 tensor, resolve_conj kills the process).
    if have.numel():
        assert have.data_ptr() % have.element_size() == 0, (
            f"{name}: {have.dtype} data at address {have.data_ptr():#x}, "
            f"not aligned to {have.element_size()} bytes"
        )


def assert_matches(
    ckpt: surgery.Checkpoint,
    expected: dict[str, torch.Tensor],
    *,
    ordered: bool = True,
    storage_sizes: bool = True,
) -> None:
    """surgery's listing and tensors are exactly `expected` (the reference reader's)."""
    assert expected, "the reference reader found no tensors: nothing would be compared"
    names = [t.name for t in ckpt.tensors]
    if ordered:
        assert names == list(expected)
    else:
        assert sorted(names) == sorted(expected)
    infos = {t.name: t for t in ckpt.tensors}
    for name, want in expected.items():
        info = infos[name]
        assert info.shape == tuple(want.shape), name
        assert info.dtype == dtype_name(want), name
        assert info.numel == want.numel(), name
        assert info.nbytes == want.numel() * want.element_size(), name

    got = ckpt.state_dict()
    assert list(got) == names
    for name, want in expected.items():
        assert_same_tensor(name, got[name], want)
        if storage_sizes:
            assert got[name].untyped_storage().nbytes() == want.untyped_storage().nbytes(), (
                f"{name}: storage of {got[name].untyped_storage().nbytes()} bytes, "
                f"torch's holds {want.untyped_storage().nbytes()}"
            )
    assert storage_groups(got) == storage_groups(expected)

    for name in dict.fromkeys(names[:2] + names[-1:]):  # the single-tensor path agrees
        assert_same_tensor(name, ckpt.tensor(name), got[name])


def torch_load(path: Path, *, trusted: bool = False) -> Any:
    # weights_only=False only for files this test wrote itself (torch's safe
    # unpickler does not know the FRAME opcode of protocols 4 and 5).
    return torch.load(path, map_location="cpu", weights_only=not trusted)


def expected_for(ckpt: surgery.Checkpoint, path: Path, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    assert ckpt.container is not None
    return flat_tensors(navigate(torch_load(path, trusted=trusted), ckpt.container))


# -- the fixtures ------------------------------------------------------------------
def test_the_fixture_set_is_the_one_expected():
    assert set(ACCEPTED) == {
        "compiled.pt",
        "cuda_saved.pth",
        "dtypes.pth",
        "ema.pth",
        "imagenet_example.pth.tar",
        "legacy.pth",
        "lightning.ckpt",
        "tied.pth",
        "tiny_state_dict.pth",
    }
    assert set(SAFETENSORS_FILES) == {"tiny.safetensors", "dtypes.safetensors"}
    assert SHARDED == ["sharded_bin", "sharded_safetensors"]
    assert set(TORCH_FILES) >= REFUSED


def test_torch_refuses_exactly_the_unsafe_fixtures():
    refused = set()
    for name in TORCH_FILES:
        try:
            torch.load(FIXTURES / name, map_location="cpu", weights_only=True)
        except Exception:
            refused.add(name)
    assert refused == REFUSED


@pytest.mark.parametrize("name", ACCEPTED)
def test_torch_fixture_matches_torch_load(name):
    path = FIXTURES / name
    ckpt = surgery.open_checkpoint(path)
    assert_matches(ckpt, expected_for(ckpt, path))
    device = "cuda:0" if name == "cuda_saved.pth" else "cpu"
    assert {t.device for t in ckpt.tensors} == {device}


@pytest.mark.parametrize("name", SAFETENSORS_FILES)
def test_safetensors_fixture_matches_load_file(name):
    path = FIXTURES / name
    ckpt = surgery.open_checkpoint(path)
    assert ckpt.container == ()
    assert_matches(ckpt, load_file(path), ordered=False, storage_sizes=False)


@pytest.mark.parametrize("name", SHARDED)
def test_sharded_fixture_matches_the_merged_shards(name):
    folder = FIXTURES / name
    (index,) = folder.glob("*.index.json")
    weight_map = json.loads(index.read_text())["weight_map"]
    expected: dict[str, torch.Tensor] = {}
    safetensors_shards = False
    for shard in dict.fromkeys(weight_map.values()):
        if shard.endswith(".safetensors"):
            safetensors_shards = True
            expected.update(load_file(folder / shard))
        else:
            expected.update(torch_load(folder / shard))
    for opened in (folder, index):
        ckpt = surgery.open_checkpoint(opened)
        assert ckpt.format == "sharded" and ckpt.container == ()
        assert_matches(ckpt, expected, ordered=not safetensors_shards, storage_sizes=not safetensors_shards)


# -- real architectures, saved now -------------------------------------------------
MODELS = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny")


@functools.cache
def model_state(name: str) -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    return model.state_dict()


def _save_torch(**kwargs: Any) -> Callable[[dict, Path], Any]:
    def save(sd: dict, path: Path) -> Any:
        torch.save(sd, path, **kwargs)
        return sd

    return save


def _save_safetensors(sd: dict, path: Path) -> Any:
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return None


def _save_data_parallel(legacy: bool) -> Callable[[dict, Path], Any]:
    def save(sd: dict, path: Path) -> Any:
        wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}
        torch.save(wrapped, path, _use_new_zipfile_serialization=not legacy)
        return wrapped

    return save


VARIANTS: dict[str, Callable[[dict, Path], Any]] = {
    "zip-p2": _save_torch(pickle_protocol=2),
    "zip-p4": _save_torch(pickle_protocol=4),
    "zip-p5": _save_torch(pickle_protocol=5),
    "legacy-p2": _save_torch(_use_new_zipfile_serialization=False, pickle_protocol=2),
    "legacy-p4": _save_torch(_use_new_zipfile_serialization=False, pickle_protocol=4),
    "legacy-p5": _save_torch(_use_new_zipfile_serialization=False, pickle_protocol=5),
    "safetensors": _save_safetensors,
    "data-parallel-zip": _save_data_parallel(legacy=False),
    "data-parallel-legacy": _save_data_parallel(legacy=True),
}
EXPECTED_FORMAT = {"zip": "torch-zip", "legacy": "torch-legacy", "safetensors": "safetensors"}


def check_saved(path: Path, variant: str) -> None:
    ckpt = surgery.open_checkpoint(path)
    kind = variant.removeprefix("data-parallel-").split("-")[0]
    assert ckpt.format == EXPECTED_FORMAT[kind]
    assert ckpt.safe, [str(f) for f in ckpt.findings]
    if kind == "safetensors":
        assert_matches(ckpt, load_file(path), ordered=False, storage_sizes=False)
        return
    if variant.startswith("data-parallel"):
        assert ckpt.container == ("state_dict",)
        assert ckpt.prefix == "module."
        assert {e.name: e.value for e in ckpt.extras} == {"epoch": 3}
    else:
        assert ckpt.container == ()
    assert_matches(ckpt, expected_for(ckpt, path, trusted=True))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model", MODELS)
def test_torchvision_model_matches(model, variant, tmp_path):
    path = tmp_path / f"{model}.{variant}"
    try:
        VARIANTS[variant](model_state(model), path)
        check_saved(path, variant)
    finally:
        path.unlink(missing_ok=True)  # up to 115 MB each: not kept in pytest's tmp folders


# -- awkward cases ---------------------------------------------------------------
class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.embed.weight


def tied_state() -> dict:
    torch.manual_seed(1)
    return TiedLM().state_dict()


def tied_parameters() -> dict:
    """keep_vars=True: nn.Parameter objects, requires_grad kept, the tie kept."""
    torch.manual_seed(2)
    return TiedLM().state_dict(keep_vars=True)


def views() -> dict:
    torch.manual_seed(3)
    big = torch.randn(10, 6)
    return {
        "a": big[2:5],  # a slice: the whole storage is saved, offset 12
        "b": big.t(),
        "c": big[:, 1],
        "d": big[::3, ::2],
        "e": torch.randn(3).expand(4, 3),  # stride 0
        "f": big,
        "g": big[9:, 5:],  # a 1x1 view at the storage's very end
        "h": big.reshape(-1)[7:7],  # empty view inside a non-empty storage
        "i": big.reshape(-1)[5],  # 0-dim view with an offset
    }


def parameters() -> dict:
    torch.manual_seed(4)
    return {
        "trainable": nn.Parameter(torch.randn(3, 2)),
        "frozen": nn.Parameter(torch.randn(2), requires_grad=False),
        "grad_tensor": torch.randn(4).requires_grad_(),
        "complex_grad_tensor": torch.randn(2, dtype=torch.complex64).requires_grad_(),
        "complex_param": nn.Parameter(torch.randn(2, dtype=torch.complex64)),
        "plain": torch.randn(2),
        "int_param": nn.Parameter(torch.arange(3), requires_grad=False),
    }


def classic_dtypes() -> dict:
    """dtypes with a legacy storage class: every format writes these."""
    torch.manual_seed(5)
    return {
        "scalar_f32": torch.tensor(3.25),
        "scalar_i64": torch.tensor(-7),
        "scalar_bool": torch.tensor(True),
        "empty_2d": torch.zeros(0, 3),
        "empty_1d": torch.zeros(0, dtype=torch.int64),
        "empty_3d": torch.zeros(2, 0, 4, dtype=torch.float16),
        "f64": torch.randn(3).double(),
        "f32": torch.randn(2, 3),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(5).bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (4,)),
        "i32": torch.randint(-(2**30), 2**30, (4,), dtype=torch.int32),
        "i16": torch.randint(-(2**15), 2**15, (4,), dtype=torch.int16),
        "i8": torch.randint(-128, 128, (4,), dtype=torch.int8),
        "u8": torch.randint(0, 256, (4,), dtype=torch.uint8),
        "bool": torch.rand(9) > 0.5,
        "c64": torch.randn(3, dtype=torch.complex64),
        "c64_conj": torch.randn(2, 2, dtype=torch.complex64).conj(),
        "c128": torch.randn(3, dtype=torch.complex128),
        "c128_conj": torch.randn(3, dtype=torch.complex128).conj(),
        "c64_neg": torch._neg_view(torch.randn(3, dtype=torch.complex64)),
        "nan_inf": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]),
    }


def _bytes_as(dtype: torch.dtype, n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8).view(dtype)


def new_dtypes() -> dict:
    """dtypes only the zip format (and some only safetensors) can hold."""
    torch.manual_seed(6)
    return {
        "u16": torch.tensor([0, 1, 2**16 - 1], dtype=torch.uint16),
        "u32": torch.tensor([0, 1, 2**32 - 1], dtype=torch.uint32),
        "u64": torch.tensor([0, 1, 2**63 + 5], dtype=torch.uint64),
        "f8_e4m3fn": _bytes_as(torch.float8_e4m3fn, 6),
        "f8_e5m2": _bytes_as(torch.float8_e5m2, 6),
        "f8_e4m3fnuz": _bytes_as(torch.float8_e4m3fnuz, 6),
        "f8_e5m2fnuz": _bytes_as(torch.float8_e5m2fnuz, 6),
        "f8_e8m0fnu": _bytes_as(torch.float8_e8m0fnu, 6),
        "f8_scalar": _bytes_as(torch.float8_e4m3fn, 1).reshape(()),
        "u16_empty": torch.zeros(0, 2, dtype=torch.uint16),
    }


def zip_only_dtypes() -> dict:
    torch.manual_seed(7)
    return {
        "c32": torch.randn(3, dtype=torch.complex64).to(torch.complex32),
        "f4x2": _bytes_as(torch.float4_e2m1fn_x2, 4),
    }


CASES: dict[str, Callable[[], dict]] = {
    "tied": tied_state,
    "tied-parameters": tied_parameters,
    "views": views,
    "parameters": parameters,
    "classic-dtypes": classic_dtypes,
    "new-dtypes": new_dtypes,
    "zip-only-dtypes": zip_only_dtypes,
}
LEGACY_CASES = ("tied", "tied-parameters", "views", "parameters", "classic-dtypes")
SAFETENSORS_CASES = ("tied", "views", "classic-dtypes", "new-dtypes")


def _case_params() -> list:
    params = []
    for case in CASES:
        params += [(case, "zip-p2"), (case, "zip-p5")]
        if case in LEGACY_CASES:
            params += [(case, "legacy-p2"), (case, "legacy-p3")]
        if case in SAFETENSORS_CASES:
            params.append((case, "safetensors"))
    return params


def _safetensors_compatible(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        v = v.detach().resolve_conj().resolve_neg()
        if v.dtype == torch.complex128:
            continue  # safetensors has no C128
        out[k] = v.contiguous().clone()  # save_file refuses shared or strided tensors
    return out


@pytest.mark.parametrize(("case", "variant"), _case_params())
def test_awkward_checkpoint_matches(case, variant, tmp_path):
    sd = CASES[case]()
    path = tmp_path / f"{case}.{variant}"
    kind, _, protocol = variant.partition("-p")
    if kind == "safetensors":
        save_file(_safetensors_compatible(sd), path)
        ckpt = surgery.open_checkpoint(path)
        assert ckpt.format == "safetensors"
        assert_matches(ckpt, load_file(path), ordered=False, storage_sizes=False)
        return
    torch.save(sd, path, pickle_protocol=int(protocol), _use_new_zipfile_serialization=kind == "zip")
    ckpt = surgery.open_checkpoint(path)
    assert ckpt.format == EXPECTED_FORMAT[kind]
    assert ckpt.safe, [str(f) for f in ckpt.findings]
    assert ckpt.container == ()
    expected = expected_for(ckpt, path, trusted=True)
    assert list(expected) == list(sd)
    assert_matches(ckpt, expected)
    if case.startswith("tied"):
        assert ckpt.shared == [["embed.weight", "lm_head.weight"]]


def test_legacy_protocol_3_is_read_as_torch_loads_it(tmp_path):
    """torch.load(weights_only=True) reads a legacy file written with protocol 3."""
    path = tmp_path / "legacy3.pth"
    sd = classic_dtypes()
    torch.save(sd, path, _use_new_zipfile_serialization=False, pickle_protocol=3)
    ckpt = surgery.open_checkpoint(path)
    assert ckpt.format == "torch-legacy"
    assert_matches(ckpt, expected_for(ckpt, path))


def _safetensors_with_header_of(size: int) -> bytes:
    """A file from the safetensors library itself whose JSON header is exactly `size` bytes."""
    from safetensors.torch import save

    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.int64)}
    base = len(save(tensors, metadata={"pad": ""})) - 8 - 48
    for pad in range(max(0, size - base - 16), size - base + 16):
        raw = save(tensors, metadata={"pad": "x" * pad})
        if int.from_bytes(raw[:8], "little") == size:
            return raw
    raise AssertionError(f"no padding gives a {size}-byte header")


# The header length is the file's first 8 bytes: 0x7b20 = 31520 starts the file
# with b" {", as a JSON text would. 31512 and 31528 are the neighbours.
@pytest.mark.parametrize("header_size", [31512, 31520, 31528])
def test_safetensors_header_length_does_not_matter(header_size, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(_safetensors_with_header_of(header_size))
    expected = load_file(path)
    ckpt = surgery.open_checkpoint(path)
    assert ckpt.format == "safetensors"
    assert_matches(ckpt, expected, ordered=False, storage_sizes=False)
