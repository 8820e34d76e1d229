"""Element types as plain names, so metadata can be read without importing torch.

One table holds what the readers need to know about each dtype: its size, its
safetensors code and the legacy storage and tensor classes that pickles name it by.
It holds every dtype torch's `weights_only` loader accepts (a test compares them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str  # torch's name without the "torch." prefix
    bits: int  # per element; sub-byte types pack several elements a byte
    safetensors: str | None  # the code in a safetensors header, if it has one
    storage: str | None = None  # typed storage class in pickles, e.g. "FloatStorage"
    tensor_class: str | None = None  # legacy tensor type, e.g. "FloatTensor" (torch.FloatTensor)

    @property
    def itemsize(self) -> int:
        """Bytes per element as torch counts them (packed types count 1)."""
        return max(1, self.bits // 8)


_TABLE = (
    DType("float64", 64, "F64", "DoubleStorage", "DoubleTensor"),
    DType("float32", 32, "F32", "FloatStorage", "FloatTensor"),
    DType("float16", 16, "F16", "HalfStorage", "HalfTensor"),
    DType("bfloat16", 16, "BF16", "BFloat16Storage", "BFloat16Tensor"),
    DType("int64", 64, "I64", "LongStorage", "LongTensor"),
    DType("int32", 32, "I32", "IntStorage", "IntTensor"),
    DType("int16", 16, "I16", "ShortStorage", "ShortTensor"),
    DType("int8", 8, "I8", "CharStorage", "CharTensor"),
    DType("uint8", 8, "U8", "ByteStorage", "ByteTensor"),
    DType("bool", 8, "BOOL", "BoolStorage", "BoolTensor"),
    DType("complex128", 128, None, "ComplexDoubleStorage"),
    DType("complex64", 64, "C64", "ComplexFloatStorage"),
    DType("complex32", 32, None),
    DType("bcomplex32", 32, None),
    DType("uint16", 16, "U16"),
    DType("uint32", 32, "U32"),
    DType("uint64", 64, "U64"),
    DType("float8_e4m3fn", 8, "F8_E4M3"),
    DType("float8_e5m2", 8, "F8_E5M2"),
    DType("float8_e4m3fnuz", 8, "F8_E4M3FNUZ"),
    DType("float8_e5m2fnuz", 8, "F8_E5M2FNUZ"),
    DType("float8_e8m0fnu", 8, "F8_E8M0"),
    DType("float4_e2m1fn_x2", 8, None),
    DType("qint8", 8, None, "QInt8Storage"),
    DType("quint8", 8, None, "QUInt8Storage"),
    DType("qint32", 32, None, "QInt32Storage"),
    DType("quint4x2", 8, None, "QUInt4x2Storage"),
    DType("quint2x4", 8, None, "QUInt2x4Storage"),
    # Bit-container dtypes: raw bits with no arithmetic, one element a whole byte (or two).
    DType("bits8", 8, None),
    DType("bits16", 16, None),
    DType("bits1x8", 8, None),
    DType("bits2x4", 8, None),
    DType("bits4x2", 8, None),
    # Sub-byte integers: torch names them, but keeps each element in a whole byte
    # (element_size 1) and torch.save refuses tensors of them; they appear as values.
    *(DType(f"uint{n}", 8, None) for n in range(1, 8)),
    *(DType(f"int{n}", 8, None) for n in range(1, 8)),
)

BY_NAME: dict[str, DType] = {d.name: d for d in _TABLE}
BY_STORAGE: dict[str, DType] = {d.storage: d for d in _TABLE if d.storage}
BY_TENSOR_CLASS: dict[str, DType] = {d.tensor_class: d for d in _TABLE if d.tensor_class}
BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in _TABLE if d.safetensors}
# Codes safetensors knows that torch has no dtype for: readable as metadata only.
SAFETENSORS_EXTRA_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}

QUANTIZED = frozenset({"qint8", "quint8", "qint32", "quint4x2", "quint2x4"})
