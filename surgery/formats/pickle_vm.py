"""A pickle machine that reads and records, and never runs anything.

`pickle.load` imports every global a pickle names and calls whatever the pickle
asks it to. This machine executes the same opcodes, all of protocols 0 to 5,
over stand-ins: a global becomes a `Global` record (never an import), a call
becomes a `Call` record unless the caller's `known` table models the callee
(torch's tensor rebuild functions), and persistent ids go to the caller's
`persistent_load`. Every global outside `known` is kept in `Result.globals`.

Work and memory stay linear in the pickle's size: declared lengths are checked
against the bytes that remain before anything is allocated, the stack and memo
are plain containers, tuples too deep or too self-similar to hash are refused
(hashing recurses in C, and shared tuples make it exponential), and nothing here
recurses. What the machine refuses to build becomes a `Refused` stand-in and
reading goes on, so a payload placed after it is still recorded.

Containers and calls nested deeper than `MAX_DEPTH` end reading with a
`PickleError`, as a structure too deep for Python's own recursion does: nothing
`pickle.dumps` writes gets there, and every later walk of the tree (the
state_dict search, the safety scan) pays for each level.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_NESTING = 100  # tuples and frozensets; real checkpoints stay under 10
# Containers and calls inside each other. pickle.dumps recurses per level and stops at
# Python's recursion limit (1000): lists of lists at 500 levels, objects at 400, tuples at
# 990; torch.save the same. A million levels took 1-22 s and 0.1-0.7 GB to read.
MAX_DEPTH = 1000
_LEAVES = frozenset({str, bytes, bytearray, int, float, bool, complex, type(None)})
_TOO_DEEP = (
    f"containers nested deeper than {MAX_DEPTH} levels: pickle.dumps cannot write this "
    "(it stops at Python's recursion limit)"
)
# Hashing a tuple visits every tuple inside it, shared ones again each time, so a
# pickle that reuses tuples through the memo can make hashing exponential. Without
# sharing a tuple holds fewer tuples than the pickle has bytes; past that bound
# (plus a margin) a tuple is refused.
HASH_WORK_MARGIN = 100_000


class PickleError(Exception):
    """The pickle is malformed; `offset` is where reading stopped."""

    def __init__(self, message: str, offset: int):
        super().__init__(f"{message} (pickle byte {offset})")
        self.offset = offset


class Truncated(PickleError):
    """The bytes end before the pickle does. Over a whole file that is the answer; over a
    prefix of one (a remote file read in growing ranges) it asks for more bytes."""


@dataclass(frozen=True)
class Global:
    """A global the pickle names: what `pickle` would import."""

    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


class Known:
    """A global the caller models: calling it runs `fn` on the pickled arguments."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name, self.fn = name, fn

    def __repr__(self) -> str:
        return self.name


class Refused:
    """A value the machine would not build: bad arguments to a known function,
    a tuple too deep or too self-similar to hash. It stands in so reading goes on."""

    __slots__ = ("reason", "offset")

    def __init__(self, reason: str, offset: int):
        self.reason, self.offset = reason, offset

    def __repr__(self) -> str:
        return f"<refused at pickle byte {self.offset}: {self.reason}>"


class Call:
    """An object the pickle would build by calling `func`: kept as a record.

    `state`, `items` and `entries` hold what BUILD, APPEND(S) and SETITEM(S)
    later gave it, so the record can still be read as a module or a container.
    """

    __slots__ = ("func", "args", "kwargs", "state", "items", "entries", "offset")

    def __init__(self, func: Any, args: tuple, kwargs: dict | None, offset: int):
        self.func, self.args, self.kwargs, self.offset = func, args, kwargs, offset
        self.state: Any = None
        self.items: list = []
        self.entries: list = []

    def __repr__(self) -> str:
        return f"<call of {describe(self.func)} at pickle byte {self.offset}>"


@dataclass(frozen=True)
class GlobalRef:
    """One place where the pickle names a global outside the known table."""

    module: str
    name: str
    offset: int
    opcode: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass
class Result:
    value: Any
    end: int  # offset just past STOP
    protocol: int
    globals: list[GlobalRef] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    # id -> (a dict, the state a BUILD gave it): an OrderedDict's attributes, e.g. a state_dict's `_metadata`
    dict_states: dict[int, tuple[dict, Any]] = field(default_factory=dict)


def describe(obj: Any, depth: int = 2) -> str:
    """A short, bounded text for a stand-in: `os.system('echo hi')`."""
    if isinstance(obj, Global):
        return obj.qualname
    if isinstance(obj, Known):
        return obj.name
    if isinstance(obj, Call):
        if depth <= 0:
            return f"{describe(obj.func, 0)}(...)"
        args = ", ".join(describe(a, depth - 1) for a in obj.args[:4])
        more = ", ..." if len(obj.args) > 4 else ""
        return f"{describe(obj.func, depth - 1)}({args}{more})"
    if isinstance(obj, (str, bytes)):
        text = repr(obj[:60])
        return text + ("..." if len(obj) > 60 else "")
    if isinstance(obj, (int, float, bool, type(None))):
        return repr(obj)[:40]
    if isinstance(obj, (tuple, list)):
        if depth <= 0:
            return "(...)" if isinstance(obj, tuple) else "[...]"
        inner = ", ".join(describe(a, depth - 1) for a in obj[:4])
        more = ", ..." if len(obj) > 4 else ""
        return f"({inner}{more})" if isinstance(obj, tuple) else f"[{inner}{more}]"
    if isinstance(obj, dict):
        return f"{{dict of {len(obj)}}}"
    return f"<{type(obj).__name__}>"


_INT32, _UINT32, _UINT16, _UINT64, _FLOAT64 = map(struct.Struct, ("<i", "<I", "<H", "<Q", ">d"))


class _Machine:
    def __init__(
        self,
        data: bytes | memoryview,
        start: int,
        known: Mapping[str, Any],
        persistent_load: Callable[[Any], Any] | None,
        size: int | None = None,
    ):
        self.data = memoryview(data)
        self.pos = start
        self.known = known
        self.persistent_load = persistent_load
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.nesting: dict[int, tuple[Any, int, int]] = {}  # id -> (tuple, depth, tuples inside)
        # id -> depth of containers and calls holding other ones (everything else is depth 1,
        # 0 for leaves); each is kept in `deep` so its id is not reused.
        self.depths: dict[int, int] = {}
        self.deep: list[Any] = []
        self.hash_work_limit = (size or len(self.data)) + HASH_WORK_MARGIN
        self.result = Result(None, start, 0)
        self.op_start = start

    # -- reading -----------------------------------------------------------
    def read(self, n: int) -> memoryview:
        if n < 0:
            raise PickleError(f"negative length {n}", self.op_start)
        end = self.pos + n
        if end > len(self.data):
            raise Truncated(
                f"pickle data was truncated: {n} bytes declared, {len(self.data) - self.pos} left",
                self.op_start,
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def readline(self) -> bytes:
        data = self.data
        end = self.pos
        # A memoryview has no find(); scan in bounded slices.
        while True:
            chunk = bytes(data[end : end + 4096])
            if not chunk:
                raise Truncated("pickle data was truncated inside a text line", self.op_start)
            i = chunk.find(b"\n")
            if i >= 0:
                line = bytes(data[self.pos : end + i])
                self.pos = end + i + 1
                return line
            end += len(chunk)

    def unpack(self, layout: struct.Struct) -> Any:
        start = self.pos
        if start + layout.size > len(self.data):
            self.read(layout.size)  # raises with the message
        self.pos = start + layout.size
        return layout.unpack_from(self.data, start)[0]

    def byte(self) -> int:
        """One unsigned byte: the argument of the commonest opcodes."""
        pos = self.pos
        if pos >= len(self.data):
            raise Truncated("pickle data was truncated: 1 byte declared, 0 left", self.op_start)
        self.pos = pos + 1
        return self.data[pos]

    # -- the stack -----------------------------------------------------------
    def pop(self) -> Any:
        if not self.stack:
            raise PickleError("stack underflow", self.op_start)
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise PickleError("stack underflow", self.op_start)
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise PickleError("no MARK on the stack", self.op_start)
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def push_nested(self, build: Callable[[Any], Any], items: Any) -> None:
        """Push a tuple or frozenset of `items`, refused if hashing it could recurse
        deeply (depth) or take exponential time (tuples inside, shared ones counted each time)."""
        depth, inside, leaves_only = 1, 1, True
        for x in items:
            kind = type(x)
            if kind in _LEAVES:
                continue
            leaves_only = False
            if kind is tuple or kind is frozenset:
                seen = self.nesting.get(id(x))
                depth = max(depth, (seen[1] if seen else 1) + 1)
                inside += seen[2] if seen else 1
        if depth > MAX_NESTING:
            self.stack.append(self.refuse(f"tuples nested deeper than {MAX_NESTING} levels"))
        elif inside > self.hash_work_limit:
            self.stack.append(
                self.refuse("a tuple that repeats itself so often that hashing it would never end")
            )
        else:
            obj = build(items)
            if depth > 1:
                self.nesting[id(obj)] = (obj, depth, inside)
            self.stack.append(obj if leaves_only else self.holding(obj, items))

    def holding(self, obj: Any, items: Any) -> Any:
        """Record that `obj` holds `items` (when built, or added to later): it is one level
        deeper than the deepest of them. Raises past MAX_DEPTH.

        Depth is tracked as things are built: an object that grows after it was put inside
        another (through the memo) does not deepen the outer one's record. Such chains
        still cost only linear work: no walk of the tree recurses."""
        depths, leaves = self.depths, _LEAVES
        deepest = 0
        for x in items:
            if type(x) not in leaves:
                level = depths.get(id(x), 1)
                if level > deepest:
                    deepest = level
        if deepest:
            seen = depths.get(id(obj))
            if seen is None or seen <= deepest:
                if deepest >= MAX_DEPTH:
                    raise PickleError(_TOO_DEEP, self.op_start)
                if seen is None:
                    self.deep.append(obj)
                depths[id(obj)] = deepest + 1
        return obj

    def refuse(self, reason: str) -> Refused:
        refused = Refused(reason, self.op_start)
        self.result.refused.append(refused)
        return refused

    # -- globals and calls ---------------------------------------------------
    def global_(self, module: Any, name: Any, opcode: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise PickleError(f"{opcode} with a non-string module or name", self.op_start)
        if self.result.protocol < 3:  # Python 2 names, mapped as pickle's fix_imports does
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            else:
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualname = f"{module}.{name}"
        if qualname in self.known:
            return self.known[qualname]
        self.result.globals.append(GlobalRef(module, name, self.op_start, opcode))
        return Global(module, name)

    def call(self, func: Any, args: Any, kwargs: Any = None, opcode: str = "REDUCE") -> Any:
        if not isinstance(args, tuple):
            raise PickleError(f"{opcode} arguments are a {type(args).__name__}, not a tuple", self.op_start)
        if kwargs is not None and not isinstance(kwargs, dict):
            raise PickleError(f"{opcode} keyword arguments are not a dict", self.op_start)
        if isinstance(func, Known):
            try:
                result = func.fn(*args, **(kwargs or {}))
            except Exception as exc:  # refused, and reading goes on: a later payload is still seen
                return self.refuse(f"bad arguments to {func.name}: {exc}")
            return result if type(result) in _LEAVES else self.holding(result, (args, kwargs))
        if not isinstance(func, (Global, Call)):
            raise PickleError(f"{opcode} calls a {type(func).__name__}, which is not callable", self.op_start)
        record = Call(func, args, kwargs, self.op_start)
        self.result.calls.append(record)
        return self.holding(record, (args, kwargs))

    def persistent(self, pid: Any) -> Any:
        if self.persistent_load is None:
            raise PickleError("persistent id in a pickle that allows none", self.op_start)
        try:
            return self.persistent_load(pid)
        except Exception as exc:
            return self.refuse(f"bad persistent id {describe(pid)}: {exc}")

    # -- the loop ------------------------------------------------------------
    def run(self) -> Result:
        data, size, ops = self.data, len(self.data), _OPS
        while True:
            pos = self.op_start = self.pos
            if pos >= size:
                raise Truncated("pickle data was truncated: no STOP", pos)
            code = data[pos]
            self.pos = pos + 1
            op = ops[code]
            if op is None:
                raise PickleError(f"unknown opcode 0x{code:02x}", self.op_start)
            if code == 0x2E:  # STOP
                self.result.value = self.pop()
                self.result.end = self.pos
                return self.result
            try:
                op(self)
            except PickleError:
                raise
            except RecursionError:
                raise PickleError(f"{op.__name__[3:]}: structure too deep", self.op_start) from None
            except Exception as exc:  # a hostile pickle must end in our error, whatever it did
                raise PickleError(f"{op.__name__[3:]}: {exc}", self.op_start) from None


def _decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _op_PROTO(m: _Machine) -> None:
    proto = m.byte()
    if proto > 5:
        raise PickleError(f"unsupported pickle protocol {proto}", m.op_start)
    m.result.protocol = proto


def _op_FRAME(m: _Machine) -> None:
    size = m.unpack(_UINT64)
    if size > len(m.data) - m.pos:
        raise Truncated(f"frame of {size} bytes runs past the end", m.op_start)


def _op_MARK(m: _Machine) -> None:
    if len(m.metastack) >= MAX_DEPTH:  # each open MARK is a container or call being built
        raise PickleError(_TOO_DEEP, m.op_start)
    m.metastack.append(m.stack)
    m.stack = []


def _op_POP(m: _Machine) -> None:
    if m.stack:
        m.stack.pop()
    else:
        m.pop_mark()


def _op_POP_MARK(m: _Machine) -> None:
    m.pop_mark()


def _op_DUP(m: _Machine) -> None:
    m.stack.append(m.top())


def _op_FLOAT(m: _Machine) -> None:
    m.stack.append(float(m.readline()))


def _op_INT(m: _Machine) -> None:
    line = m.readline()
    if line == b"00":
        m.stack.append(False)
    elif line == b"01":
        m.stack.append(True)
    else:
        m.stack.append(int(line, 0))


def _op_LONG(m: _Machine) -> None:
    line = m.readline()
    if line.endswith(b"L"):
        line = line[:-1]
    m.stack.append(int(line, 0))


def _op_BININT(m: _Machine) -> None:
    m.stack.append(m.unpack(_INT32))


def _op_BININT1(m: _Machine) -> None:
    m.stack.append(m.byte())


def _op_BININT2(m: _Machine) -> None:
    m.stack.append(m.unpack(_UINT16))


def _op_LONG1(m: _Machine) -> None:
    n = m.byte()
    m.stack.append(int.from_bytes(m.read(n), "little", signed=True))


def _op_LONG4(m: _Machine) -> None:
    n = m.unpack(_INT32)
    m.stack.append(int.from_bytes(m.read(n), "little", signed=True))


def _op_BINFLOAT(m: _Machine) -> None:
    m.stack.append(m.unpack(_FLOAT64))


def _op_STRING(m: _Machine) -> None:
    line = m.readline().rstrip()
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
        raise PickleError("STRING argument is not quoted", m.op_start)
    m.stack.append(_decode_text(codecs.escape_decode(line[1:-1])[0]))


def _op_BINSTRING(m: _Machine) -> None:
    m.stack.append(_decode_text(bytes(m.read(m.unpack(_INT32)))))


def _op_SHORT_BINSTRING(m: _Machine) -> None:
    m.stack.append(_decode_text(bytes(m.read(m.byte()))))


def _op_BINBYTES(m: _Machine) -> None:
    m.stack.append(bytes(m.read(m.unpack(_UINT32))))


def _op_SHORT_BINBYTES(m: _Machine) -> None:
    m.stack.append(bytes(m.read(m.byte())))


def _op_BINBYTES8(m: _Machine) -> None:
    m.stack.append(bytes(m.read(m.unpack(_UINT64))))


def _op_BYTEARRAY8(m: _Machine) -> None:
    m.stack.append(bytearray(m.read(m.unpack(_UINT64))))


def _op_NEXT_BUFFER(m: _Machine) -> None:
    raise PickleError("out-of-band buffer requested, none can be supplied", m.op_start)


def _op_READONLY_BUFFER(m: _Machine) -> None:
    m.top()


def _op_UNICODE(m: _Machine) -> None:
    m.stack.append(m.readline().decode("raw-unicode-escape"))


def _op_SHORT_BINUNICODE(m: _Machine) -> None:
    m.stack.append(str(m.read(m.byte()), "utf-8", "surrogatepass"))


def _op_BINUNICODE(m: _Machine) -> None:
    m.stack.append(str(m.read(m.unpack(_UINT32)), "utf-8", "surrogatepass"))


def _op_BINUNICODE8(m: _Machine) -> None:
    m.stack.append(str(m.read(m.unpack(_UINT64)), "utf-8", "surrogatepass"))


def _op_NONE(m: _Machine) -> None:
    m.stack.append(None)


def _op_NEWTRUE(m: _Machine) -> None:
    m.stack.append(True)


def _op_NEWFALSE(m: _Machine) -> None:
    m.stack.append(False)


def _op_EMPTY_TUPLE(m: _Machine) -> None:
    m.stack.append(())


def _op_EMPTY_LIST(m: _Machine) -> None:
    m.stack.append([])


def _op_EMPTY_DICT(m: _Machine) -> None:
    m.stack.append({})


def _op_EMPTY_SET(m: _Machine) -> None:
    m.stack.append(set())


def _op_TUPLE(m: _Machine) -> None:
    m.push_nested(tuple, m.pop_mark())


def _op_TUPLE1(m: _Machine) -> None:
    m.push_nested(tuple, [m.pop()])


def _op_TUPLE2(m: _Machine) -> None:
    b, a = m.pop(), m.pop()
    m.push_nested(tuple, (a, b))


def _op_TUPLE3(m: _Machine) -> None:
    c, b, a = m.pop(), m.pop(), m.pop()
    m.push_nested(tuple, (a, b, c))


def _op_LIST(m: _Machine) -> None:
    items = m.pop_mark()  # before touching m.stack: pop_mark replaces it
    m.stack.append(m.holding(items, items))


def _op_DICT(m: _Machine) -> None:
    items = m.pop_mark()
    if len(items) % 2:
        raise PickleError("DICT with an odd number of items", m.op_start)
    m.stack.append(m.holding({items[i]: items[i + 1] for i in range(0, len(items), 2)}, items))


def _op_FROZENSET(m: _Machine) -> None:
    m.push_nested(frozenset, m.pop_mark())


def _op_ADDITEMS(m: _Machine) -> None:
    items = m.pop_mark()
    target = m.top()
    if isinstance(target, Call):
        target.items.extend(items)
    elif type(target) is set:
        target.update(items)
    else:
        raise PickleError(f"ADDITEMS to a {type(target).__name__}", m.op_start)
    m.holding(target, items)


def _append(m: _Machine, items: list[Any], opcode: str) -> None:
    target = m.top()
    if type(target) is list:
        target.extend(items)
    elif isinstance(target, Call):
        target.items.extend(items)
    else:
        raise PickleError(f"{opcode} to a {type(target).__name__}", m.op_start)
    m.holding(target, items)


def _op_APPEND(m: _Machine) -> None:
    item = m.pop()
    _append(m, [item], "APPEND")


def _op_APPENDS(m: _Machine) -> None:
    _append(m, m.pop_mark(), "APPENDS")


def _setitems(m: _Machine, items: list[Any], opcode: str) -> None:
    if len(items) % 2:
        raise PickleError(f"{opcode} with an odd number of items", m.op_start)
    target = m.top()
    pairs = [(items[i], items[i + 1]) for i in range(0, len(items), 2)]
    if type(target) is dict:
        for key, value in pairs:
            target[key] = value
    elif isinstance(target, Call):
        target.entries.extend(pairs)
    else:
        raise PickleError(f"{opcode} on a {type(target).__name__}", m.op_start)
    m.holding(target, items)


def _op_SETITEM(m: _Machine) -> None:
    value, key = m.pop(), m.pop()
    _setitems(m, [key, value], "SETITEM")


def _op_SETITEMS(m: _Machine) -> None:
    _setitems(m, m.pop_mark(), "SETITEMS")


def _op_BUILD(m: _Machine) -> None:
    state = m.pop()
    target = m.top()
    if isinstance(target, Call):
        target.state = state
        m.holding(target, (state,))
    elif type(target) is dict:  # OrderedDict attributes, such as a state_dict's `_metadata`: kept aside
        if type(state) is dict and "_metadata" in state:
            m.result.dict_states[id(target)] = (target, state)
    elif not hasattr(target, "build"):
        raise PickleError(f"BUILD on a {type(target).__name__}", m.op_start)
    else:
        target.build(state)


def _op_GLOBAL(m: _Machine) -> None:
    module = _decode_text(m.readline())
    name = _decode_text(m.readline())
    m.stack.append(m.global_(module, name, "GLOBAL"))


def _op_STACK_GLOBAL(m: _Machine) -> None:
    name, module = m.pop(), m.pop()
    m.stack.append(m.global_(module, name, "STACK_GLOBAL"))


def _op_INST(m: _Machine) -> None:
    module = _decode_text(m.readline())
    name = _decode_text(m.readline())
    cls = m.global_(module, name, "INST")
    args = tuple(m.pop_mark())
    m.stack.append(m.call(cls, args, opcode="INST"))


def _op_OBJ(m: _Machine) -> None:
    items = m.pop_mark()
    if not items:
        raise PickleError("OBJ without a class", m.op_start)
    m.stack.append(m.call(items[0], tuple(items[1:]), opcode="OBJ"))


def _op_NEWOBJ(m: _Machine) -> None:
    args, cls = m.pop(), m.pop()
    m.stack.append(m.call(cls, args, opcode="NEWOBJ"))


def _op_NEWOBJ_EX(m: _Machine) -> None:
    kwargs, args, cls = m.pop(), m.pop(), m.pop()
    m.stack.append(m.call(cls, args, kwargs, opcode="NEWOBJ_EX"))


def _op_REDUCE(m: _Machine) -> None:
    args = m.pop()
    func = m.pop()
    m.stack.append(m.call(func, args))


def _extension(m: _Machine, code: int) -> None:
    # The loading process resolves the code through its copyreg registry:
    # unknowable here, so it is a global like any other unknown one.
    if code <= 0:
        raise PickleError("EXT specifies code <= 0", m.op_start)
    m.stack.append(m.global_("copyreg", f"<extension code {code}>", "EXT"))


def _op_EXT1(m: _Machine) -> None:
    _extension(m, m.byte())


def _op_EXT2(m: _Machine) -> None:
    _extension(m, m.unpack(_UINT16))


def _op_EXT4(m: _Machine) -> None:
    _extension(m, m.unpack(_INT32))


def _op_PERSID(m: _Machine) -> None:
    m.stack.append(m.persistent(_decode_text(m.readline())))


def _op_BINPERSID(m: _Machine) -> None:
    m.stack.append(m.persistent(m.pop()))


# GET and PUT are a third of a torch pickle's opcodes: no more calls than needed.
def _get(m: _Machine, index: int) -> None:
    try:
        m.stack.append(m.memo[index])
    except KeyError:
        raise PickleError(f"memo has no entry {index}", m.op_start) from None


def _put(m: _Machine, index: int) -> None:
    if index < 0:
        raise PickleError("negative memo index", m.op_start)
    if not m.stack:
        raise PickleError("stack underflow", m.op_start)
    m.memo[index] = m.stack[-1]


def _op_GET(m: _Machine) -> None:
    _get(m, int(m.readline()))


def _op_BINGET(m: _Machine) -> None:
    _get(m, m.byte())


def _op_LONG_BINGET(m: _Machine) -> None:
    _get(m, m.unpack(_UINT32))


def _op_PUT(m: _Machine) -> None:
    _put(m, int(m.readline()))


def _op_BINPUT(m: _Machine) -> None:
    _put(m, m.byte())


def _op_LONG_BINPUT(m: _Machine) -> None:
    _put(m, m.unpack(_UINT32))


def _op_MEMOIZE(m: _Machine) -> None:
    _put(m, len(m.memo))


def _op_STOP(m: _Machine) -> None:  # handled in the loop
    raise AssertionError


_OPCODES = {
    "(": _op_MARK, ".": _op_STOP, "0": _op_POP, "1": _op_POP_MARK, "2": _op_DUP,
    "F": _op_FLOAT, "I": _op_INT, "J": _op_BININT, "K": _op_BININT1, "L": _op_LONG,
    "M": _op_BININT2, "N": _op_NONE, "P": _op_PERSID, "Q": _op_BINPERSID,
    "R": _op_REDUCE, "S": _op_STRING, "T": _op_BINSTRING, "U": _op_SHORT_BINSTRING,
    "V": _op_UNICODE, "X": _op_BINUNICODE, "a": _op_APPEND, "b": _op_BUILD,
    "c": _op_GLOBAL, "d": _op_DICT, "}": _op_EMPTY_DICT, "e": _op_APPENDS,
    "g": _op_GET, "h": _op_BINGET, "i": _op_INST, "j": _op_LONG_BINGET,
    "l": _op_LIST, "]": _op_EMPTY_LIST, "o": _op_OBJ, "p": _op_PUT, "q": _op_BINPUT,
    "r": _op_LONG_BINPUT, "s": _op_SETITEM, "t": _op_TUPLE, ")": _op_EMPTY_TUPLE,
    "u": _op_SETITEMS, "G": _op_BINFLOAT,
    "\x80": _op_PROTO, "\x81": _op_NEWOBJ, "\x82": _op_EXT1, "\x83": _op_EXT2,
    "\x84": _op_EXT4, "\x85": _op_TUPLE1, "\x86": _op_TUPLE2, "\x87": _op_TUPLE3,
    "\x88": _op_NEWTRUE, "\x89": _op_NEWFALSE, "\x8a": _op_LONG1, "\x8b": _op_LONG4,
    "B": _op_BINBYTES, "C": _op_SHORT_BINBYTES,
    "\x8c": _op_SHORT_BINUNICODE, "\x8d": _op_BINUNICODE8, "\x8e": _op_BINBYTES8,
    "\x8f": _op_EMPTY_SET, "\x90": _op_ADDITEMS, "\x91": _op_FROZENSET,
    "\x92": _op_NEWOBJ_EX, "\x93": _op_STACK_GLOBAL, "\x94": _op_MEMOIZE,
    "\x95": _op_FRAME, "\x96": _op_BYTEARRAY8, "\x97": _op_NEXT_BUFFER,
    "\x98": _op_READONLY_BUFFER,
}  # fmt: skip
PICKLE_OPCODE_BYTES = frozenset(ord(k) for k in _OPCODES)
_OPS = [_OPCODES.get(chr(code)) for code in range(256)]  # by opcode byte: a list is the fastest lookup


def run(
    data: bytes | memoryview,
    *,
    start: int = 0,
    known: Mapping[str, Any] | None = None,
    persistent_load: Callable[[Any], Any] | None = None,
    size: int | None = None,
) -> Result:
    """Execute the pickle at `data[start:]` over stand-ins, up to its STOP.

    Args:
        data: the bytes holding the pickle (more may follow it).
        start: where the pickle begins.
        known: globals by qualified name that the caller models: a `Known`
            is called with the pickled arguments, anything else is pushed as is.
        persistent_load: turns a persistent id into a stand-in.
        size: the length of the whole file when `data` is only a prefix of it (a remote
            file read in growing ranges), so that limits scale with the file as they do locally.

    Returns:
        The value at STOP, where STOP ended, and every unknown global and call.

    Raises:
        PickleError: the pickle is malformed, truncated (`Truncated`) or too deep. Its
            `partial` attribute holds what was recorded before the error.
    """
    machine = _Machine(data, start, known or {}, persistent_load, size)
    try:
        return machine.run()
    except PickleError as exc:
        exc.partial = machine.result  # type: ignore[attr-defined]
        raise
