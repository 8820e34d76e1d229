"""Writing one output from several processes: `torchrun --nproc-per-node N -m surgery convert`.

Under torchrun (`WORLD_SIZE` > 1) every rank opens the source and makes the same plan from its
headers; the output's parts are then shared out by bytes (`balance`): whole shards of a sharded
folder, tensors of a DCP folder (one `__R_0.distcp` per rank). Rank 0 makes the temporary folder
beside the output and names it to the others; each rank writes its parts into it; rank 0, once
every rank has said how it went, writes the index (or `.metadata`) and puts the folder in place.
A failure on any rank is said to all of them: nothing is put in place, and every rank raises the
first failing rank's error. The ranks talk through torch.distributed (gloo, on the CPU), as torch's
own checkpointing does; the bytes go straight to the shared folder, never through the group.

A single-file output has one writer: rank 0 writes it, the other ranks wait and say nothing.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from surgery.errors import SurgeryError

if TYPE_CHECKING:
    from surgery.commands.convert import Destination, Output

T = TypeVar("T")
TIMEOUT = timedelta(hours=2)  # how long a rank waits for the others: a big shard may take a while


@dataclass(frozen=True)
class Ranks:
    """This process's rank in a group started by torchrun, and the group's size."""

    rank: int
    world: int

    def broadcast(self, value: Any = None) -> Any:
        """Rank 0's `value`, on every rank."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values


def ranks_from_env() -> Ranks | None:
    """The group torchrun started this process in (joined on first use), or None alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)
        atexit.register(_leave)  # a group left joined aborts the process at exit (gloo's threads)
    return Ranks(dist.get_rank(), dist.get_world_size())


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def balance(sizes: Sequence[int], world: int) -> list[int]:
    """The rank of each part: the largest first, each to the rank with the fewest bytes so far
    (the lower rank on a tie). The same on every rank: a pure function of the sizes.

    Example:
        >>> balance([5, 1, 4, 3], 2)
        [0, 0, 1, 1]
    """
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += sizes[i]
    return owner


@dataclass(frozen=True)
class Failure:
    """A rank's error, as it travels to the others."""

    rank: int
    where: str
    message: str
    hint: str | None
    exit_code: int

    @classmethod
    def of(cls, rank: int, error: BaseException) -> Failure:
        if isinstance(error, SurgeryError):
            return cls(rank, error.where, error.message, error.hint, error.exit_code)
        return cls(rank, f"rank {rank}", f"{type(error).__name__}: {error}", None, 1)

    def error(self) -> SurgeryError:
        failed = SurgeryError(self.where, f"{self.message} (rank {self.rank})", hint=self.hint)
        failed.exit_code = self.exit_code
        return failed


def run_ranked(
    ranks: Ranks,
    out: Path,
    size: int,
    write_part: Callable[[Path], Any],
    finish: Callable[[Path, list[Any]], None],
) -> list[Any]:
    """Write one output folder from every rank: rank 0 makes the temporary folder, every rank
    runs `write_part(tmp)`, and rank 0, when all succeeded, runs `finish(tmp, every rank's
    result)` and puts the folder in place. Returns every rank's result, on every rank.

    Raises:
        SurgeryError: the first failing rank's error, on every rank (nothing is put in place).
    """
    from surgery.writers.outputs import atomic_folder

    if ranks.rank != 0:
        made = _heard(ranks)  # the folder, or rank 0's failure to make it
        try:
            results = _gathered(ranks, lambda: write_part(Path(made)))
        except _Told as told:
            raise told.failure.error() from None
        _heard(ranks)  # None once in place, or rank 0's failure to finish
        return results
    try:
        with atomic_folder(out, size=size) as tmp:
            ranks.broadcast(str(tmp))
            results = _gathered(ranks, lambda: write_part(tmp))
            finish(tmp, results)
    except _Told as told:  # every rank knows: each raises it
        raise told.failure.error() from None
    except BaseException as error:  # making the folder, or finishing: the others wait on rank 0
        ranks.broadcast(Failure.of(0, error))
        raise
    ranks.broadcast(None)
    return results


def _heard(ranks: Ranks) -> Any:
    """What rank 0 broadcast; its failure, raised here."""
    said = ranks.broadcast()
    if isinstance(said, Failure):
        raise said.error()
    return said


class _Told(Exception):
    """A rank's failure, already gathered by every rank."""

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure


def _gathered(ranks: Ranks, work: Callable[[], Any]) -> list[Any]:
    """Every rank's result of `work`; when any rank failed, every rank raises the first failure."""
    try:
        mine: Any = ("ok", work())
    except BaseException as error:  # told to the others first: none may wait for this rank forever
        mine = ("failed", Failure.of(ranks.rank, error))
    everyone = ranks.gather(mine)
    failures = [value for status, value in everyone if status == "failed"]
    if failures:
        raise _Told(failures[0])
    return [value for _, value in everyone]


@dataclass(frozen=True)
class Part:
    """What one rank wrote: its bytes, and what its source counted (casts that lost values,
    tensors copied as raw bytes) for the report every rank returns."""

    rank: int
    nbytes: int
    lossy: dict[str, Any]  # output name -> CastLosses
    raw: int
    dcp: Any = None  # writers.dcp.DcpPart: a DCP part's metadata


def write_ranked(output: Output, request: Destination, ranks: Ranks) -> tuple[list[str], list[Part]]:
    """Write `output` from every rank (its kind in RANKED), or from rank 0 alone (a single file):
    the shard names, and every rank's part."""
    writer = RANKED.get(output.kind)
    if writer is None:
        return _on_rank_zero(output, request, ranks)
    return writer(output, request, ranks)


def _part(output: Output, ranks: Ranks, nbytes: int, dcp: Any = None) -> Part:
    src = output.src
    return Part(ranks.rank, nbytes, dict(getattr(src, "lossy", {})), getattr(src, "raw", 0), dcp)


def _absorb(output: Output, parts: list[Part]) -> None:
    """The other ranks' lost casts into rank 0's source, before the output is checked."""
    lossy = getattr(output.src, "lossy", None)
    if lossy is not None:
        for part in parts:
            lossy.update(part.lossy)


def _sharded(output: Output, request: Destination, ranks: Ranks) -> tuple[list[str], list[Part]]:
    """A sharded folder: whole shards per rank, the index by rank 0."""
    from surgery.writers.safetensors import _check_safetensors_dtypes
    from surgery.writers.sharded import shard_names, shards_of, write_index, write_shard_files

    entries, torch_format = output.plan.entries, output.kind == "sharded-torch"
    if not torch_format:
        _check_safetensors_dtypes(output.path, entries)
    shards = shards_of(entries, request.shard_size or 0)
    names = shard_names(len(shards), torch_format=torch_format)
    owner = balance([sum(e.nbytes for e in group) for group in shards], ranks.world)
    mine = [i for i in range(len(shards)) if owner[i] == ranks.rank]
    aliases = output.plan.aliases if torch_format else {}

    def write_part(tmp: Path) -> Part:
        write_shard_files(
            tmp,
            [names[i] for i in mine],
            [shards[i] for i in mine],
            output.src.get,
            torch_format=torch_format,
            done=output.src.done,
            aliases=aliases,
        )
        return _part(output, ranks, sum(e.nbytes for i in mine for e in shards[i]))

    def finish(tmp: Path, parts: list[Part]) -> None:
        _absorb(output, parts)
        write_index(tmp, names, shards, output.metadata, torch_format=torch_format)
        if output.check is not None:
            output.check(tmp)

    size = sum(e.nbytes for e in entries if e.name not in aliases)
    return names, run_ranked(ranks, output.path, size, write_part, finish)


def _dcp(output: Output, request: Destination, ranks: Ranks) -> tuple[list[str], list[Part]]:
    """A DCP folder: tensors shared out by bytes, one `__R_0.distcp` per rank, `.metadata` by rank 0."""
    import json

    from surgery.writers.dcp import write_dcp_file, write_dcp_metadata

    entries = output.plan.entries
    owner = balance([e.nbytes for e in entries], ranks.world)
    mine = [e for e, rank in zip(entries, owner, strict=True) if rank == ranks.rank]

    def write_part(tmp: Path) -> Part:
        part = write_dcp_file(tmp, f"__{ranks.rank}_0.distcp", mine, output.src.get, done=output.src.done)
        return _part(output, ranks, sum(e.nbytes for e in mine), part)

    def finish(tmp: Path, parts: list[Part]) -> None:
        _absorb(output, parts)
        write_dcp_metadata(tmp, *(p.dcp for p in parts), order=[e.name for e in entries])
        (tmp / "surgery.json").write_text(json.dumps(output.metadata, indent=1) + "\n")
        if output.check is not None:
            output.check(tmp)

    return [], run_ranked(ranks, output.path, sum(e.nbytes for e in entries), write_part, finish)


def _hf(output: Output, request: Destination, ranks: Ranks) -> tuple[list[str], list[Part]]:
    """A Hugging Face folder (convert --format hf): whole shards per rank, config and index by rank 0."""
    from surgery.writers.hf import hf_layout

    assert output.config is not None
    layout = hf_layout(
        output.path,
        output.plan.entries,
        output.metadata,
        shard_size=request.shard_size,
        aliases=output.plan.aliases,
    )
    names, parts = write_hf_ranked(
        ranks, output.path, layout, output.src.get, output.config, output=output, check=output.check
    )
    return (names if len(names) > 1 else []), parts


def write_hf_ranked(
    ranks: Ranks,
    out: Path,
    layout: Any,
    get: Callable[[str], Any],
    config: str,
    *,
    output: Output | None = None,
    done: Callable[[str], None] | None = None,
    check: Callable[[Path], None] | None = None,
) -> tuple[list[str], list[Part]]:
    """A Hugging Face folder (`writers.hf.HfLayout`) from every rank: its shards shared out by
    bytes, config.json and the index by rank 0 (one shard: rank 0 writes it). Used by convert
    and by port under torchrun."""
    from surgery.writers.hf import finish_hf_folder, write_hf_files

    owner = balance([sum(e.nbytes for e in shard) for shard in layout.shards], ranks.world)
    mine = [i for i, rank in enumerate(owner) if rank == ranks.rank]
    done = done or (output.src.done if output is not None else None)

    def write_part(tmp: Path) -> Part:
        write_hf_files(tmp, layout, mine, get, done=done)
        nbytes = sum(e.nbytes for i in mine for e in layout.shards[i])
        return _part(output, ranks, nbytes) if output is not None else Part(ranks.rank, nbytes, {}, 0)

    def finish(tmp: Path, parts: list[Part]) -> None:
        if output is not None:
            _absorb(output, parts)
        finish_hf_folder(tmp, layout, config)
        if check is not None:
            check(tmp)

    return layout.names, run_ranked(ranks, out, layout.nbytes + len(config), write_part, finish)


def _on_rank_zero(output: Output, request: Destination, ranks: Ranks) -> tuple[list[str], list[Part]]:
    """A single file: rank 0 writes it; the others wait to hear how it went."""
    from surgery.commands.convert import WRITERS

    names = _by_rank_zero(ranks, lambda: WRITERS[output.kind](output, request))
    if ranks.rank != 0:
        return [], []
    plan = output.plan
    return names, [_part(output, ranks, sum(e.nbytes for e in plan.entries if e.name not in plan.aliases))]


def on_rank_zero(work: Callable[[], T]) -> T | None:
    """`work()` once: alone, or under torchrun by rank 0 while the others wait to hear how it
    went (None on them; rank 0's error, on every rank). A port writes one file: one writer."""
    ranks = ranks_from_env()
    return work() if ranks is None else _by_rank_zero(ranks, work)


def _by_rank_zero(ranks: Ranks, work: Callable[[], T]) -> T | None:
    """`work()` on rank 0, its outcome broadcast: the others return None, or raise its error."""
    if ranks.rank != 0:
        return _heard(ranks)
    try:
        result = work()
    except BaseException as error:
        ranks.broadcast(Failure.of(0, error))
        raise
    ranks.broadcast(None)
    return result


RANKED = {"sharded-safetensors": _sharded, "sharded-torch": _sharded, "dcp": _dcp, "hf": _hf}
