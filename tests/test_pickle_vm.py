"""The pickle machine agrees with `pickle.loads` on plain data, at every protocol,
and models torch's rebuild calls without importing torch."""

from __future__ import annotations

import pickle
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery.formats import pickle_vm
from surgery.formats.pickle_vm import Call, Global, PickleError
from surgery.formats.torch_pickle import KNOWN, StorageTable, TensorRef

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
hashables = st.recursive(scalars, lambda inner: st.tuples(inner, inner), max_leaves=6)
values = st.recursive(
    scalars | st.builds(bytearray, st.binary(max_size=8)),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(hashables, inner, max_size=4)
        | st.sets(hashables, max_size=4)
    ),
    max_leaves=20,
)


@pytest.mark.parametrize("protocol", range(6))
@settings(max_examples=60, deadline=None)
@given(value=values)
def test_plain_data_reads_exactly_as_pickle_loads_it(protocol, value):
    data = pickle.dumps(value, protocol=protocol)
    result = pickle_vm.run(data, known=KNOWN)
    assert result.value == pickle.loads(data)
    assert result.globals == [] and result.calls == []
    assert result.end == len(data)


@pytest.mark.parametrize("protocol", range(6))
def test_shared_references_stay_shared(protocol):
    inner = [1, 2]
    outer = [inner, inner, {"again": inner}]
    outer.append(outer)  # and a cycle
    value = pickle_vm.run(pickle.dumps(outer, protocol=protocol), known=KNOWN).value
    assert value[0] is value[1] is value[2]["again"]
    assert value[3] is value


def test_ordered_dict_with_metadata_becomes_a_dict():
    sd = OrderedDict(a=1)
    sd._metadata = {"": {"version": 1}}  # what state_dict() attaches
    value = pickle_vm.run(pickle.dumps(sd, protocol=2), known=KNOWN).value
    assert value == {"a": 1} and type(value) is dict


def test_unknown_global_is_recorded_and_called_only_as_a_record():
    data = b"cos\nsystem\n(S'echo hi'\ntR."
    result = pickle_vm.run(data, known=KNOWN)
    assert [g.qualname for g in result.globals] == ["os.system"]
    assert isinstance(result.value, Call) and result.value.func == Global("os", "system")
    assert result.value.args == ("echo hi",)


def test_python2_builtin_names_are_mapped_like_pickle_does():
    result = pickle_vm.run(b"\x80\x02c__builtin__\neval\nX\x01\x00\x00\x001\x85R.", known=KNOWN)
    assert [g.qualname for g in result.globals] == ["builtins.eval"]


def test_tensor_metadata_is_read_from_a_torch_pickle(tmp_path):
    import io
    import zipfile

    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2, 3).t()}, buf)
    data = zipfile.ZipFile(buf).read("archive/data.pkl")
    table = StorageTable()
    value = pickle_vm.run(data, known=KNOWN, persistent_load=table).value
    ref = value["w"]
    assert isinstance(ref, TensorRef)
    assert (ref.shape, ref.stride, ref.offset, ref.dtype.name) == ((3, 2), (1, 3), 0, "float32")
    assert table.storages["0"].numel == 6


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "truncated"),
        (b"\x80\x02", "truncated"),
        (b"\x80\x02]q\x00h\x05.", "memo has no entry 5"),
        (b"\x80\x02a.", "stack underflow"),
        (b"\x80\x02e.", "no MARK"),
        (b"\x80\x02\xff.", "unknown opcode 0xff"),
        (b"\x80\x06N.", "unsupported pickle protocol"),
        (b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b".", "truncated"),
        (b"\x80\x02\x8b\x00\x00\x00\x40.", "truncated"),
        (b"\x80\x02K\x01)R.", "not callable"),
        (b"\x80\x04](K\x01\x90.", "ADDITEMS to a list"),
        (b"\x80\x02(K\x01K\x02K\x03d.", "odd number"),
    ],
)
def test_malformed_pickles_end_in_a_pickle_error(data, message):
    with pytest.raises(PickleError, match=message):
        pickle_vm.run(data, known=KNOWN)


def test_deeply_nested_tuples_are_refused_before_hashing_can_recurse():
    data = b"\x80\x02N" + b"\x85" * 10_000 + b"."
    result = pickle_vm.run(data, known=KNOWN)
    assert result.refused and "nested deeper than 100" in result.refused[0].reason
    hash(result.value)  # bounded: the refused level stands in for everything below it


def test_self_similar_tuples_are_refused_before_hashing_takes_forever():
    # t = (t, t) sixty times through the memo: 2**60 tuples to hash as a dict key.
    data = b"\x80\x02}N" + b"q\x00h\x00\x86" * 60 + b"K\x01s."
    result = pickle_vm.run(data, known=KNOWN)
    assert "repeats itself" in result.refused[0].reason


def test_reading_goes_on_after_a_refused_value_so_a_later_payload_is_seen():
    data = b"\x80\x02]c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85Rac__builtin__\neval\nX\x01\x00\x00\x001\x85Ra."
    result = pickle_vm.run(data, known=KNOWN)
    assert "allocates without data" in result.refused[0].reason
    assert [g.qualname for g in result.globals] == ["builtins.eval"]


def test_deeply_nested_lists_are_built_without_recursion():
    n = pickle_vm.MAX_DEPTH  # deeper is refused: see test_hostile_amplification.py
    data = b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."
    value = pickle_vm.run(data, known=KNOWN).value
    depth = 0
    while value:
        value, depth = value[0], depth + 1
    assert depth == n - 1


def test_describe_is_bounded_for_huge_arguments():
    data = b"cos\nsystem\n(S'" + b"x" * 10_000 + b"'\ntR."
    text = pickle_vm.describe(pickle_vm.run(data, known=KNOWN).value)
    assert text.startswith("os.system('xxx") and len(text) < 120
