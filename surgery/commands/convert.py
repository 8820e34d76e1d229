"""Converting a checkpoint between formats, one tensor at a time.

Source: anything `open_checkpoint` reads. Output: a safetensors file, a torch
file, a sharded folder (safetensors or torch shards plus the index others read)
or a torch.distributed.checkpoint folder. Keys go through the same pipeline as
`surgery port` (strip, add, rename, include, exclude); floating tensors can be
cast. When a tensor's bytes can be written as they lie in the source (no cast,
contiguous, little-endian), they are copied file to file by the kernel without
importing torch; otherwise one tensor at a time is built, written and released,
so memory follows the largest tensor, not the checkpoint. A cast that overflows to
inf, makes NaN or flushes non-zero values to zero is counted per tensor, and the output
is not put in place unless `allow_lossy_cast`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from surgery import __version__
from surgery.casts import Buffer, CastLosses, LossyCast, count_losses, may_lose, tally
from surgery.commands.requests import Request, given
from surgery.errors import BadArgument, SurgeryError, UsageError
from surgery.formats.checkpoint import ALIASES_KEY, Checkpoint, open_trusted
from surgery.plans.keys import KeyRules, Rename
from surgery.text import human_bytes, plural
from surgery.values import Entry
from surgery.writers import write_state_dict
from surgery.writers.cast import Caster, casts_without_torch
from surgery.writers.copy import Pieces, RawBytes
from surgery.writers.hf import folder_config
from surgery.writers.outputs import atomic_folder, check_destination, check_folder_destination
from surgery.writers.sharded import write_sharded
from surgery.writers.torch_archive import streams_torch

if TYPE_CHECKING:
    import torch

FORMATS = ("auto", "safetensors", "torch", "dcp", "hf")
CASTS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16",
         "float16": "float16", "float32": "float32", "half": "float16", "float": "float32"}  # fmt: skip
FLOATING = {"float16", "bfloat16", "float32", "float64"}
# A conversion writes what the input stores, or less (optimizer state, extras and unused
# storage left out), up to 2x with a cast to fp32 from a half-precision file. More than 4x
# means views that repeat stored bytes (stride 0: a 1.6 KB file viewing 4 bytes as 2**40
# floats writes 4 TiB) or a deflated archive of very compressible data: refused unless asked.
MAX_OUTPUT_RATIO = 4.0
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}  # fmt: skip


@dataclass(frozen=True)
class ConvertRequest(Request):
    """Everything `surgery convert` does, as one value (flags, a TOML file, or a script).

    Example:
        >>> surgery.convert_file(ConvertRequest("ckpt.pth", "model.safetensors", dtype="bfloat16"))
    """

    source: str
    out: str
    keys: KeyRules = KeyRules()
    dtype: str | None = None  # bfloat16 | float16 | float32: floating tensors only
    format: str = "auto"  # by OUT's name: .safetensors, a folder with a shard size, else torch
    shard_size: int | None = None  # bytes per shard: a sharded folder
    max_output_ratio: float = MAX_OUTPUT_RATIO
    verify: bool = False
    allow_lossy_cast: bool = False  # write casts that overflow to inf, make NaN or flush to zero
    dry_run: bool = False
    force: bool = False
    trust: bool = False

    FILE_FIELDS: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "source": str,
        "out": str,
        **KeyRules.FILE_FIELDS,
        "dtype": str,
        "format": str,
        "shard_size": (str, int),
        "max_output_ratio": float,
        "verify": bool,
        "allow_lossy_cast": bool,
    }

    def __post_init__(self) -> None:
        if not self.source:
            raise BadArgument("source", "name the checkpoint to convert")
        if not self.out:
            raise BadArgument("out", "say where to write the result (-o OUT)")
        if self.format not in FORMATS:
            raise BadArgument("format", f"{self.format!r} is not one of {', '.join(FORMATS)}")
        if self.dtype is not None and self.dtype not in FLOATING:
            raise BadArgument("dtype", f"{self.dtype!r} is not one of bf16, fp16, fp32")
        if self.shard_size is not None and self.shard_size <= 0:
            raise BadArgument("shard_size", "must be more than 0 bytes")
        if self.shard_size is not None and self.format == "dcp":
            raise BadArgument(
                "shard_size", "a DCP folder is written by torch's own layout: drop the shard size"
            )
        if not self.max_output_ratio > 0:
            raise BadArgument("max_output_ratio", f"must be more than 0, got {self.max_output_ratio}")

    @classmethod
    def from_fields(
        cls, fields: Mapping[str, Any], *, file: str | None = None, from_file: frozenset = frozenset()
    ) -> ConvertRequest:
        """A request from flat fields (the flags' long names); `dtype` may be an alias
        (`bf16`, `half`), `shard_size` a size such as `2GB`."""
        fields = given(fields)
        dtype = fields.get("dtype")
        if dtype is not None and str(dtype).lower() not in CASTS:
            raise BadArgument("dtype", f"{dtype!r} is not one of bf16, fp16, fp32")
        size = fields.get("shard_size")
        return cls(
            source=str(fields.get("source") or ""),
            out=str(fields.get("out") or ""),
            keys=KeyRules.from_fields(fields),
            dtype=CASTS[str(dtype).lower()] if dtype is not None else None,
            format=fields.get("format", "auto"),
            shard_size=parse_size(size) if isinstance(size, str) else size,
            max_output_ratio=float(fields.get("max_output_ratio", MAX_OUTPUT_RATIO)),
            verify=bool(fields.get("verify")),
            allow_lossy_cast=bool(fields.get("allow_lossy_cast")),
            dry_run=bool(fields.get("dry_run")),
            force=bool(fields.get("force")),
            trust=bool(fields.get("trust")),
        )

    def rules_json(self) -> dict[str, Any]:
        """What the conversion does to names and values: the report's `options`, and the
        provenance an output carries."""
        return {
            **self.keys.to_json(),
            "dtype": self.dtype,
            "format": self.format,
            "shard_size": self.shard_size,
        }


@dataclass(frozen=True)
class ConvertReport:
    """What a conversion read, changed and wrote."""

    source: str
    source_format: str
    container: tuple[str, ...] | None
    output: str
    output_format: str
    options: ConvertRequest
    tensors: int
    bytes_out: int
    steps: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()
    cast: dict[str, int] = field(default_factory=dict)  # "float32 -> bfloat16" -> tensors
    lossy: dict[str, CastLosses] = field(default_factory=dict)  # output name -> what its cast lost
    aliases: dict[str, str] = field(default_factory=dict)  # output alias -> the name stored
    aliases_in_metadata: bool = False  # safetensors: stored once, the alias named in the metadata
    raw: int = 0  # tensors copied as raw bytes
    shards: tuple[str, ...] = ()
    seconds: float = 0.0
    written: bool = False
    verified: int | None = None
    rank: int = 0  # under torchrun: this process's rank (only rank 0 shows the report)
    ranks: tuple[int, ...] = ()  # under torchrun: the bytes each rank wrote

    def summary(self) -> str:
        text = f"{plural(self.tensors, 'tensor')}, {human_bytes(self.bytes_out)}"
        if self.lossy and not self.written:
            return f"refused: the cast of {plural(len(self.lossy), 'tensor')} loses values; nothing written"
        if self.written:
            text = f"wrote {text} in {self.seconds:.2f} s ({human_bytes(int(self.bytes_out / max(self.seconds, 1e-9)))}/s)"
            if len(self.ranks) > 1:
                text += f" by {len(self.ranks)} ranks ({', '.join(human_bytes(n) for n in self.ranks)})"
        else:
            text = f"would write {text} (--dry-run)"
        if self.raw:
            text += f"; {self.raw} copied as raw bytes"
        if self.cast:
            text += f"; {sum(self.cast.values())} cast"
        if self.lossy:
            text += f", {len(self.lossy)} of them lossy"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "surgery_json": 1,
            "source": self.source,
            "source_format": self.source_format,
            "container": list(self.container) if self.container is not None else None,
            "output": self.output,
            "output_format": self.output_format,
            "options": self.options.rules_json(),
            "tensors": self.tensors,
            "bytes": self.bytes_out,
            "steps": list(self.steps),
            "left_out": list(self.left_out),
            "cast": self.cast,
            "lossy_cast": {name: losses.to_json() for name, losses in self.lossy.items()},
            "aliases": self.aliases,
            "raw_copied": self.raw,
            "shards": list(self.shards),
            "ranks": list(self.ranks),
            "seconds": round(self.seconds, 3),
            "written": self.written,
            "verified": self.verified,
        }


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, '1e9' -> 1_000_000_000."""
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("BKMGTI")
    unit = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise BadArgument("shard_size", f"{text!r} is not a size such as 2GB, 500MB or 1GiB") from None
    if unit not in UNITS or not math.isfinite(value):
        raise BadArgument("shard_size", f"{text!r} is not a size such as 2GB, 500MB or 1GiB")
    return int(value * UNITS[unit])


class Destination(Protocol):
    """What choosing and writing an output reads of a request (convert's, merge's)."""

    format: str  # auto | safetensors | torch | dcp | hf
    shard_size: int | None


def output_format(out: Path, options: Destination) -> str:
    """safetensors | torch | sharded-safetensors | sharded-torch | dcp | hf."""
    kind = options.format
    if kind == "hf":  # a Hugging Face model folder, sharded past --shard-size (5GB by default)
        return kind
    if kind == "auto":
        if out.suffix == ".safetensors" or (options.shard_size and out.suffix != ".bin"):
            kind = "safetensors"
        else:
            kind = "torch"
    if kind == "dcp":
        return "dcp"
    return f"sharded-{kind}" if options.shard_size else kind


@dataclass
class _Plan:
    """Names, shapes and dtypes of the output, and where each comes from."""

    ckpt: Checkpoint
    entries: list[Entry]  # what is written, in source order (aliases left out for safetensors)
    source_of: dict[str, str]  # output name -> source name
    aliases: dict[str, str]  # output alias -> output name stored
    steps: list[str]
    left_out: list[str]
    cast: dict[str, int]


def plan_convert(ckpt: Checkpoint, options: ConvertRequest, kind: str) -> _Plan:
    """The output's keys, dtypes and aliases, from names and metadata only."""
    kept, steps = options.keys.apply(t.name for t in ckpt.tensors)
    if not kept:
        raise UsageError(ckpt.path, "no tensors left after --include/--exclude")
    unusual = [t for t in ckpt.tensors if t.name in kept and t.note]
    if unusual:
        t = unusual[0]
        raise SurgeryError(
            ckpt.path,
            f"tensor {t.name!r} is {t.note}",
            hint="leave it out with --exclude, or convert with torch",
        )
    ties = {} if kind == "dcp" else {a: k for a, k in ckpt.aliases.items() if a in kept and k in kept}
    entries, cast = [], {}
    for t in ckpt.tensors:
        if t.name not in kept:
            continue
        dtype = t.dtype
        if options.dtype and dtype in FLOATING and dtype != options.dtype:
            change = f"{dtype} -> {options.dtype}"
            cast[change] = cast.get(change, 0) + 1
            dtype = options.dtype
        if t.name in ties and kind.endswith("safetensors"):
            continue  # safetensors stores one name per storage: the alias goes in the metadata
        entries.append(Entry(kept[t.name], t.shape, dtype))
    return _Plan(
        ckpt,
        entries,
        {new: old for old, new in kept.items()},
        {kept[a]: kept[k] for a, k in ties.items()},
        steps,
        [t.name for t in ckpt.tensors if t.name not in kept],
        cast,
    )


class _Source:
    """Hands the writer each output tensor: a byte range of the source when it can be
    copied as it lies, else its bytes cast piece by piece (without torch for float32 to
    bfloat16 or float16 lying as plain data; or, for writers that need whole tensors, the
    tensor), released once written. What each cast lost is counted in `lossy` (output
    name -> losses) as the pieces go by."""

    def __init__(self, plan: _Plan, streams: bool, progress: Callable[[int], None] | None):
        self.plan, self.streams, self.progress = plan, streams, progress
        self.dtypes = {e.name: e.dtype for e in plan.entries}
        self.nbytes = {e.name: e.nbytes for e in plan.entries}
        self.raw = 0
        self.lossy: dict[str, CastLosses] = {}
        self.caster = Caster()

    def get(self, name: str) -> torch.Tensor | RawBytes | Pieces:
        source = self.plan.source_of[name]
        info = self.plan.ckpt.tensors_by_name[source]
        if not self.streams:
            return self.tensor(name)
        dtype = self.dtypes[name]
        where = self.plan.ckpt.byte_range(source)
        if where is not None and info.dtype == dtype:
            self.raw += 1
            return RawBytes(*where)
        if where is not None and casts_without_torch(info.dtype, dtype):
            return Pieces(self._numpy_cast(name, where, dtype))
        return Pieces(self._cast(name, source, dtype))

    def _numpy_cast(self, name: str, where: tuple[str, int, int], dtype_name: str) -> Iterator[memoryview]:
        """The float32 tensor lying at `where` cast without torch, its losses counted."""
        for source, cast in self.caster.pieces(*where, dtype_name):
            self.count(name, "float32", source, cast)
            yield cast

    def _cast(self, name: str, source: str, dtype_name: str) -> Iterator[memoryview]:
        """The source tensor cast by torch piece by piece: memory follows the piece, not the tensor."""
        import torch

        dtype = getattr(torch, dtype_name)
        for piece in self.plan.ckpt.pieces(source):
            cast = memoryview(piece.to(dtype).contiguous().view(torch.uint8).numpy())
            self.count(name, _dtype_name(piece), piece.view(torch.uint8).numpy(), cast)
            yield cast

    def count(self, name: str, source_dtype: str, before: Buffer, after: Buffer) -> None:
        """Add what casting one piece of output tensor `name` lost to `lossy`: its bytes
        before (as `source_dtype`) and after the cast, however the cast was made."""
        if not may_lose(source_dtype, self.dtypes[name]):
            return
        tally(self.lossy, name, count_losses(before, after, source_dtype, self.dtypes[name]))

    def tensor(self, name: str) -> torch.Tensor:
        import torch

        from surgery.formats.tensors import flat_pieces

        value = self.plan.ckpt.tensor(self.plan.source_of[name]).detach()
        dtype = getattr(torch, self.dtypes.get(name) or str(value.dtype).removeprefix("torch."))
        if value.dtype == dtype:
            return value
        cast = value.to(dtype)
        for piece, piece_cast in zip(flat_pieces(value), flat_pieces(cast), strict=True):
            self.count(
                name,
                _dtype_name(piece),
                piece.view(torch.uint8).numpy(),
                piece_cast.view(torch.uint8).numpy(),
            )
        return cast

    def done(self, name: str) -> None:
        self.plan.ckpt.release(self.plan.source_of[name])
        if self.progress is not None:
            self.progress(self.nbytes.get(name, 0))


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def convert(
    source: str | Path,
    out: str | Path,
    *,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
    add_prefix: str | None = None,
    rename: Sequence[str | Rename] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dtype: str | None = None,
    format: str = "auto",
    shard_size: str | int | None = None,
    dry_run: bool = False,
    force: bool = False,
    verify: bool = False,
    trust: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    max_output_ratio: float = MAX_OUTPUT_RATIO,
    allow_lossy_cast: bool = False,
) -> ConvertReport:
    """Convert `source` into `out`, streaming, atomically (`convert_file` with a request).

    Args:
        key, strip_prefix, add_prefix, rename, include, exclude: as for `surgery.port`.
        dtype: bf16 | fp16 | fp32: cast floating tensors (integer buffers stay as they are).
        format: auto (safetensors for `*.safetensors`, else torch) | safetensors | torch | dcp.
        shard_size: bytes (or '2GB') per shard: `out` becomes a sharded folder with an index.
        verify: re-read the written output before it is put in place and compare
            every tensor with its source.
        trust: read the tensors of a source with unsafe findings (never executed).
        progress: called once with (tensors, bytes) to announce the work; returns
            the function told how many bytes each written tensor added.
        max_output_ratio: refuse, before writing, an output of more than this many times
            the bytes of the input files (views that repeat stored bytes expand when written).
        allow_lossy_cast: write an output whose cast overflowed to inf, made NaN or flushed
            non-zero values to zero (counted per tensor in the report either way).

    Raises:
        BadArgument: a parameter that cannot work, named.
        UsageError: an output that would lose data (an input, or existing without `force`).
        LossyCast: the cast lost values and `allow_lossy_cast` is not set (nothing is written;
            the report rides on it).
        SurgeryError: an unreadable or unsafe source, an output past `max_output_ratio` or the
            free space, a failed write (nothing is left behind).

    Example:
        >>> surgery.convert("ckpt.pth", "model.safetensors", strip_prefix=["module."], dtype="bf16")
    """
    fields = {k: v for k, v in locals().items() if k not in ("source", "out", "progress")}
    request = ConvertRequest.from_fields({"source": str(source), "out": str(out), **fields})
    return convert_file(request, progress=progress)


def convert_file(
    request: ConvertRequest, *, progress: Callable[[int, int], Callable[[int], None]] | None = None
) -> ConvertReport:
    """`surgery convert` as a library call: the request's source written to its output.

    Args:
        progress: called once with (tensors, bytes) to announce the work; returns the
            function told how many bytes each written tensor added.
    """
    out = Path(request.out)
    ckpt = open_trusted(request.source, key=request.keys.key, trust=request.trust, purpose="convert")
    kind = output_format(out, request)
    if kind in FOLDERS:
        check_folder_destination(out, list(ckpt.files), force=request.force)
    else:
        check_destination(out, list(ckpt.files), force=request.force)
    config = folder_config(ckpt.metadata, ckpt.path) if kind == "hf" else None  # before any work
    plan = plan_convert(ckpt, request, kind)
    report = ConvertReport(
        str(ckpt.path),
        ckpt.format,
        ckpt.container,
        str(out),
        kind,
        request,
        tensors=len(plan.entries) + (len(plan.aliases) if kind.endswith("safetensors") else 0),
        bytes_out=sum(e.nbytes for e in plan.entries),
        steps=tuple(plan.steps),
        left_out=tuple(plan.left_out),
        cast=plan.cast,
        aliases=plan.aliases,
        aliases_in_metadata=kind in ("safetensors", "sharded-safetensors", "hf"),
    )
    if request.dry_run:
        return report
    check_expansion(plan, output_nbytes(plan), request.max_output_ratio)
    started = time.perf_counter()
    tick = progress(len(plan.entries), report.bytes_out) if progress is not None else None
    # safetensors writers take byte ranges; torch and DCP archives when streams_torch says so
    streams = kind.endswith("safetensors") or kind == "hf" or streams_torch(plan.entries)
    src = _Source(plan, streams=streams, progress=tick)
    checked: list[int] = []

    def check(written: Path) -> None:  # before the rename: an output that fails is never put in place
        if src.lossy and not request.allow_lossy_cast:
            raise LossyCast(ckpt.path, replace(report, raw=src.raw, lossy=dict(src.lossy)), dict(src.lossy))
        if request.verify:
            checked.append(verify_conversion(written, plan, where=out))

    metadata = _provenance(ckpt, plan, request)
    output = Output(out, kind, plan, src, metadata, check, config)
    from surgery.commands.ranks import ranks_from_env, write_ranked

    ranks = ranks_from_env()  # under torchrun: every rank writes its share
    parts: list = []
    try:
        if ranks is None:
            shards = WRITERS[kind](output, request)
        else:
            shards, parts = write_ranked(output, request, ranks)
    finally:
        src.caster.close()
    return replace(
        report,
        lossy={name: lost for p in parts for name, lost in p.lossy.items()} if parts else dict(src.lossy),
        raw=sum(p.raw for p in parts) if parts else src.raw,
        rank=ranks.rank if ranks else 0,
        ranks=tuple(p.nbytes for p in parts),
        shards=tuple(shards),
        seconds=time.perf_counter() - started,
        written=True,
        verified=checked[0] if checked else None,
    )


class Layout(Protocol):
    """What a writer reads of a plan (convert's, merge's): the entries in order, the tied names."""

    entries: list[Entry]
    aliases: dict[str, str]  # output alias -> the name stored


class Tensors(Protocol):
    """What hands a writer each tensor (convert's `_Source`, merge's), and hears when it is written."""

    def get(self, name: str) -> torch.Tensor | RawBytes | Pieces: ...

    def done(self, name: str) -> None: ...


@dataclass(frozen=True)
class Output:
    """What a writer is handed: where, which kind, the plan, the tensors, the provenance."""

    path: Path
    kind: str
    plan: Layout
    src: Tensors
    metadata: dict[str, str]
    check: Callable[[Path], None] | None
    config: str | None = None  # hf: the config.json to write beside the weights


def _write_file(output: Output, request: Destination) -> list[str]:
    """One safetensors or torch file; a torch file keeps tied names in one storage."""
    write_state_dict(
        output.path,
        output.plan.entries,
        output.src.get,
        output.metadata,
        done=output.src.done,
        check=output.check,
        aliases=output.plan.aliases if output.kind == "torch" else {},
        safetensors=output.kind == "safetensors",
    )
    return []


def _write_shards(output: Output, request: Destination) -> list[str]:
    """A folder of shards of at most `shard_size` bytes and their index."""
    return write_sharded(
        output.path,
        output.plan.entries,
        output.src.get,
        output.metadata,
        shard_size=request.shard_size or 0,
        torch_format=output.kind == "sharded-torch",
        done=output.src.done,
        check=output.check,
        aliases=output.plan.aliases if output.kind == "sharded-torch" else {},
    )


def _write_dcp(output: Output, request: Destination) -> list[str]:
    """A DCP folder (torch's layout, streamed by surgery) put in place only when complete."""
    from surgery.writers.dcp import write_dcp

    with atomic_folder(output.path, size=output_nbytes(output.plan)) as tmp:
        write_dcp(tmp, output.plan.entries, output.src.get, done=output.src.done)
        (tmp / "surgery.json").write_text(json.dumps(output.metadata, indent=1) + "\n")
        if output.check is not None:
            output.check(tmp)
    return []


def _write_hf(output: Output, request: Destination) -> list[str]:
    """A Hugging Face model folder: the source folder's config.json beside the weights."""
    from surgery.writers.hf import write_hf_folder

    assert output.config is not None
    names = write_hf_folder(
        output.path,
        output.plan.entries,
        output.src.get,
        output.metadata,
        config=output.config,
        shard_size=request.shard_size,
        done=output.src.done,
        check=output.check,
        aliases=output.plan.aliases,
    )
    return names if len(names) > 1 else []  # shards only


# Every kind of output convert writes, and what writes it.
WRITERS = {
    "safetensors": _write_file,
    "torch": _write_file,
    "sharded-safetensors": _write_shards,
    "sharded-torch": _write_shards,
    "dcp": _write_dcp,
    "hf": _write_hf,
}
FOLDERS = ("sharded-safetensors", "sharded-torch", "dcp", "hf")


def output_nbytes(plan: Layout) -> int:
    """Bytes of tensor data the output holds: every entry in full, a tied name once
    (safetensors plans hold no tied names; torch outputs store them in one storage)."""
    return sum(e.nbytes for e in plan.entries if e.name not in plan.aliases)


def check_expansion(plan: _Plan, nbytes: int, max_ratio: float) -> None:
    """Refuse an output of more than `max_ratio` times the bytes of the input files.

    Raises:
        SurgeryError: naming the source, the sizes, and the tensor that grows the most.
    """
    ckpt = plan.ckpt
    stored = sum(p.stat().st_size for p in ckpt.files)
    if nbytes <= max_ratio * stored:
        return
    grown = max(plan.entries, key=lambda e: e.nbytes / max(ckpt.span(plan.source_of[e.name]), 1))
    span = ckpt.span(plan.source_of[grown.name])
    raise SurgeryError(
        ckpt.path,
        f"the output would be {human_bytes(nbytes)}, {nbytes / max(stored, 1):,.0f}x the {human_bytes(stored)} "
        f"of the input (--max-output-ratio {max_ratio:g}): tensor {grown.name!r} alone is "
        f"{human_bytes(grown.nbytes)}, viewed from {human_bytes(span)} of the file",
        hint="views that repeat their bytes (stride 0) are written in full: leave the tensor out "
        "with --exclude, or pass a larger --max-output-ratio if the output is wanted",
    )


def verify_conversion(written: Path, plan: _Plan, where: Path | None = None) -> int:
    """Re-read every tensor of the output and compare it with its source (after any cast),
    one tensor at a time, as bytes where both lie as plain data (no torch). Returns how many
    were compared; raises naming the first difference."""
    from surgery.commands.diff import same_tensor
    from surgery.formats.checkpoint import open_checkpoint

    where = where or written
    reread = open_checkpoint(written)
    names = {t.name for t in reread.tensors}
    wanted = [e.name for e in plan.entries]
    wanted += [a for a in plan.aliases if a not in wanted]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise SurgeryError(where, f"verify: tensor {missing[0]!r} is not in the output")
    dtypes = {e.name: e.dtype for e in plan.entries}
    for name in wanted:
        source = plan.source_of[name]
        dtype = dtypes.get(name) or dtypes[plan.aliases[name]]
        if not same_tensor(plan.ckpt, source, reread, name, cast=dtype):
            raise SurgeryError(where, f"verify: tensor {name!r} differs from its source {source!r}")
    return len(wanted)


def _provenance(ckpt: Checkpoint, plan: _Plan, options: ConvertRequest) -> dict[str, str]:
    """Where the output came from. Files are named with their sizes, not hashed: hashing
    would read the source a second time, and convert runs at disk speed."""
    meta = {
        "format": "pt",
        "surgery.version": __version__,
        "surgery.source": str(ckpt.path),
        "surgery.source_files": json.dumps(
            [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in ckpt.files]
        ),
        "surgery.container": ".".join(ckpt.container or ()) or "(top level)",
        "surgery.rules": json.dumps(options.rules_json()),
    }
    if plan.aliases:
        meta[ALIASES_KEY] = json.dumps(plan.aliases)
    return meta
