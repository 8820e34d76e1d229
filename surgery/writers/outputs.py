"""Outputs appear whole or not at all: a temporary name beside the output, fsync, rename.

A failed or interrupted write (an exception, Ctrl-C, SIGTERM) leaves nothing behind and
never a half-written checkpoint; what a killed run leaves is removed by the next write
there. Destinations are checked before any work: never an input, never over an existing
output without `force`, never past the free space.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import threading
import zlib
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from surgery.errors import SurgeryError, UsageError

if TYPE_CHECKING:
    from collections.abc import Iterator


def check_destination(out: Path, sources: list[Path], *, force: bool) -> None:
    """Refuse an output that would lose data or cannot be written, before any work.

    Raises:
        UsageError: OUT is one of the inputs, exists without `force`, or its folder is missing.
    """
    for source in sources:
        same_file = out.exists() and source.exists() and os.path.samefile(out, source)
        if same_file or out.resolve() == source.resolve():
            raise UsageError(out, "the output is an input of this run: it would be overwritten")
    if out.is_dir():
        raise UsageError(out, "the output is a folder: name a file")
    if out.exists() and not force:
        raise UsageError(out, "the output exists", hint="pass --force to replace it")
    if not out.parent.is_dir():
        raise UsageError(out, f"the folder {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UsageError(out, f"the folder {str(out.parent)!r} is not writable")


def check_space(out: Path, size: int) -> None:
    """Refuse, before anything is written, an output larger than the free space where it goes.

    Raises:
        SurgeryError: naming the output, the bytes it needs and the bytes free.
    """
    free = free_bytes(out.parent)
    if free is not None and size > free:  # unknown: the write itself will say what is wrong
        raise SurgeryError(
            out,
            f"the output needs {size:,} bytes ({_gib(size)}), more than the {free:,} ({_gib(free)}) "
            "free on its filesystem",
            hint="free some space, or write the output to another disk",
        )


def free_bytes(folder: Path) -> int | None:
    """Bytes free on the filesystem holding `folder`; None when the system cannot tell."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):,.1f} GiB"


@contextmanager
def atomic(out: Path, check: Callable[[Path], None] | None = None, *, size: int = 0) -> Iterator[BinaryIO]:
    """A temporary file beside `out`, renamed over it only when everything was written
    (and `check`, given the temporary file's path, raised nothing). `size`, the bytes about
    to be written, is checked against the free space first. The temporary file goes on
    an exception, Ctrl-C or SIGTERM; one left by a killed run is removed by the next."""
    check_space(out, size)
    remove_stale_temps(out.parent)
    tmp = _temp_path(out, ".tmp")
    made: list[Path] = []  # what this write created and must remove unless put in place

    def remove() -> None:
        for path in made:
            with suppress(FileNotFoundError):
                os.unlink(path)

    with _on_sigterm(remove) as interrupted:
        try:
            made.append(tmp)  # first: a signal landing right after the open must find it listed
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # an ordinary file, by umask
            with os.fdopen(fd, "w+b") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            if check is not None:
                check(tmp)
            interrupted()
            os.replace(tmp, out)
            _fsync_folder(out.parent)
        except OSError as exc:
            raise SurgeryError(out, f"cannot write: {exc.strerror or exc}") from None
        finally:
            remove()


# Temporary outputs are named `.<output>.surgery-<host>-<pid>-<random>.tmp`: a later write
# into the same folder removes those of this machine whose process is gone (SIGKILL, power
# loss) and nothing else. The host tag keeps a process on another machine sharing the folder
# (NFS) from looking dead here.
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"


_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_TEMP_NAME = re.compile(r"\..+\.surgery-([0-9a-f]{8})-([0-9]+)-[a-z0-9_]{8}\.tmp")


def _temp_path(out: Path, suffix: str) -> Path:
    """A new name beside `out` in surgery's temporary naming (the file is not made here)."""
    return out.parent / f".{out.name}.surgery-{_HOST}-{os.getpid()}-{os.urandom(4).hex()}{suffix}"


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files and folders that surgery runs on this machine left in
    `folder` when they were killed: surgery's own naming, this host's tag, and the pid of
    a process that no longer exists. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or match[1] != _HOST or _running(int(match[2])):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue  # another run removed it first, or it is not ours to remove
        removed.append(Path(entry.path))
    return removed


def _running(pid: int) -> bool:
    """Whether a process with this pid exists (in doubt: yes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # another user's process (EPERM), or a pid this system cannot have
    return True


class Terminated(BaseException):
    """SIGTERM arrived during a write that a program's own SIGTERM handler governs: raised
    to leave the write (its temporary output already gone) before that handler runs."""


class _Sigterm:
    """The SIGTERM handler while a write runs. It removes the temporary output itself, so
    the cleanup does not depend on where the signal lands; then, by default, the process
    ends with the signal's own status. Under a program's own handler it raises `Terminated`
    instead, and `check()` raises it again before anything is put in place, should code on
    the way have swallowed it."""

    def __init__(self, cleanup: Callable[[], None], previous: Callable[..., object] | int):
        self.cleanup, self.previous, self.received = cleanup, previous, False

    def __call__(self, signum: int, frame: object) -> None:
        if self.received:
            return  # the first one is being handled
        self.received = True
        with suppress(OSError):
            self.cleanup()
        if not callable(self.previous):  # SIG_DFL: end as killed by SIGTERM (143 in a shell)
            signal.signal(signum, self.previous)
            signal.raise_signal(signum)
        raise Terminated(f"signal {signum} during a write")

    def check(self) -> None:
        if self.received:
            raise Terminated("SIGTERM during a write")


@contextmanager
def _on_sigterm(cleanup: Callable[[], None]) -> Iterator[Callable[[], None]]:
    """While an output is written, SIGTERM first runs `cleanup` (the temporary output goes,
    as on Ctrl-C), then takes its usual course with the handler in place before, restored:
    by default the process ends as killed by SIGTERM; a program's own handler runs once the
    write is left. Yields the check to make before putting the output in place. Nothing
    changes where SIGTERM is ignored, or outside the main thread (Python runs signal
    handlers there only)."""
    previous = signal.getsignal(signal.SIGTERM)
    main = threading.current_thread() is threading.main_thread()
    if not main or previous is signal.SIG_IGN or previous is None:  # None: not set from Python
        yield lambda: None
        return
    handler = _Sigterm(cleanup, previous)
    signal.signal(signal.SIGTERM, handler)
    try:
        yield handler.check
    except BaseException:
        if handler.received and callable(previous):
            signal.signal(signal.SIGTERM, previous)
            previous(signal.SIGTERM, None)  # the program's own handler, from a plain frame
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(out: Path, *, size: int = 0) -> Iterator[Path]:
    """A temporary folder beside `out`, put in its place only when everything was written;
    an existing `out` (allowed by --force) is replaced only then. `size`, the bytes about
    to be written, is checked against the free space first. As for `atomic`, nothing is
    left behind on an exception, Ctrl-C or SIGTERM."""
    check_space(out, size)
    remove_stale_temps(out.parent)
    tmp, old = _temp_path(out, ".tmp"), _temp_path(out, ".old")  # old: the replaced output, meanwhile
    made: list[Path] = []

    def undo() -> None:
        """The temporary folder goes; a replaced output comes back if the new one is not in place."""
        if old in made:
            if not out.exists() and (old / out.name).exists():
                os.replace(old / out.name, out)
            shutil.rmtree(old, ignore_errors=True)
        if tmp in made:
            shutil.rmtree(tmp, ignore_errors=True)

    with _on_sigterm(undo) as interrupted:
        try:
            made.append(tmp)  # first, as in `atomic`
            os.mkdir(tmp, 0o777)  # an ordinary folder, by umask
            yield tmp
            for path in tmp.iterdir():
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
            interrupted()
            if out.exists():
                made.append(old)
                os.mkdir(old, 0o700)
                os.replace(out, old / out.name)
            os.replace(tmp, out)
            _fsync_folder(out.parent)
        except OSError as exc:
            raise SurgeryError(out, f"cannot write: {exc.strerror or exc}") from None
        finally:
            undo()


def check_folder_destination(out: Path, sources: list[Path], *, force: bool) -> None:
    """An output folder: not an input's folder, not a file, empty unless `force`, in an existing folder."""
    for source in sources:
        if out.resolve() in (source.resolve(), source.resolve().parent):
            raise UsageError(out, "the output folder holds an input of this run")
    if out.exists() and not out.is_dir():
        raise UsageError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(
                out, "the output folder exists and is not empty", hint="pass --force to replace it"
            )
        others = sorted(p.name for p in out.iterdir() if not _checkpoint_output(p))
        if others:
            raise UsageError(
                out,
                f"--force replaces a checkpoint folder, and this one also holds {', '.join(others[:3])}",
                hint="choose another output folder, or remove those files yourself",
            )
    if not out.parent.is_dir():
        raise UsageError(out, f"the folder {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UsageError(out, f"the folder {str(out.parent)!r} is not writable")


def _checkpoint_output(path: Path) -> bool:
    """A file a sharded, DCP or Hugging Face output consists of: what --force may replace."""
    name = path.name
    return path.is_file() and (
        name.endswith((".safetensors", ".bin", ".index.json", ".distcp"))
        or name in (".metadata", "surgery.json", "config.json", "adapter_config.json")
    )
