"""Rule files (issue 13): the ops on shapes against the ops on tensors, the tensor ops against
their references (transformers' rotary permutation, timm's resampling), a real port of a
Meta-style model into a fused-attention layout through the CLI and the library, and every
way a rule file can be wrong, each refused in one line with nothing written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_clean_error, run_cli
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import surgery
from surgery.models.transforms import permute_rope, resample_patch_embed, resample_pos_embed, run_ops
from surgery.plans.ops import OPS, OpError, make_op, run_shapes
from surgery.plans.rules import RuleError, plan_rules, rules_from_doc
from surgery.values import Entry


def seeded(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def rope_reference(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.py `permute`, for a weight or a bias."""
    rows = w.shape[0]
    if w.ndim == 1:
        return w.view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)
    return w.view(heads, rows // heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(rows, w.shape[1])


# == 1. every op: the shapes planned are the shapes made, and the values are right =======
@dataclass(frozen=True)
class OpCase:
    """Ops on seeded tensors of `inputs` shapes, filling targets of `targets` shapes;
    `expect(inputs, target_tensors)` computes what they must make, without the engine."""

    id: str
    ops: list[dict[str, Any]]
    inputs: list[tuple[int, ...]]
    targets: list[tuple[int, ...]]
    expect: Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]]
    dtype: torch.dtype = torch.float32


def _timm_pos(prefix: int, mode: str = "bicubic") -> Callable:
    from timm.layers import resample_abs_pos_embed

    def expect(xs, ts):
        side = int((ts[0].shape[1] - prefix) ** 0.5)
        return [resample_abs_pos_embed(xs[0], [side, side], num_prefix_tokens=prefix, interpolation=mode)]

    return expect


def _grown(xs, ts, new):
    return [torch.cat([xs[0], new(xs[0], ts[0])])]


def _mean_rows(x, t):
    return x.double().mean(0, keepdim=True).to(x.dtype).expand(t.shape[0] - x.shape[0], *x.shape[1:])


OP_CASES = [
    OpCase("cat", [{"op": "cat"}], [(2, 3), (4, 3), (1, 3)], [(7, 3)], lambda xs, ts: [torch.cat(xs)]),
    OpCase(
        "cat-last-dim",
        [{"op": "cat", "dim": -1}],
        [(2, 3), (2, 5)],
        [(2, 8)],
        lambda xs, ts: [torch.cat(xs, -1)],
    ),
    OpCase(
        "stack", [{"op": "stack", "dim": 1}], [(2, 3)] * 3, [(2, 3, 3)], lambda xs, ts: [torch.stack(xs, 1)]
    ),
    OpCase(
        "split-sizes",
        [{"op": "split", "sizes": [2, 3, 4]}],
        [(9, 4)],
        [(2, 4), (3, 4), (4, 4)],
        lambda xs, ts: list(xs[0].split([2, 3, 4])),
    ),
    OpCase(  # grouped-query attention: q has more rows than k and v; no sizes given
        "split-by-targets",
        [{"op": "split"}],
        [(16, 8)],
        [(8, 8), (4, 8), (4, 8)],
        lambda xs, ts: list(xs[0].split([8, 4, 4])),
    ),
    OpCase(
        "split-equal",
        [{"op": "split", "dim": 1}],
        [(4, 12)],
        [(4, 4)] * 3,
        lambda xs, ts: list(xs[0].split(4, 1)),
    ),
    OpCase(  # not the last op: equal parts, whatever the targets
        "split-then-transpose",
        [{"op": "split"}, {"op": "transpose"}],
        [(6, 4)],
        [(4, 3), (4, 3)],
        lambda xs, ts: [p.T for p in xs[0].split(3)],
    ),
    OpCase(
        "conv1d-transpose-split",
        [{"op": "transpose"}, {"op": "split", "dim": 0}],
        [(8, 24)],
        [(12, 8), (12, 8)],
        lambda xs, ts: list(xs[0].T.split(12)),
    ),
    OpCase("unstack", [{"op": "unstack"}], [(3, 2, 5)], [(2, 5)] * 3, lambda xs, ts: list(xs[0].unbind(0))),
    OpCase(
        "unstack-dim1",
        [{"op": "unstack", "dim": 1}],
        [(2, 3, 5)],
        [(2, 5)] * 3,
        lambda xs, ts: list(xs[0].unbind(1)),
    ),
    OpCase(
        "cat-then-transpose",
        [{"op": "cat"}, {"op": "transpose"}],
        [(2, 3), (2, 3)],
        [(3, 4)],
        lambda xs, ts: [torch.cat(xs).T],
    ),
    OpCase("transpose", [{"op": "transpose"}], [(3, 5)], [(5, 3)], lambda xs, ts: [xs[0].T]),
    OpCase(
        "transpose-4d",
        [{"op": "transpose", "dim0": 1, "dim1": -1}],
        [(2, 3, 4, 5)],
        [(2, 5, 4, 3)],
        lambda xs, ts: [xs[0].transpose(1, 3)],
    ),
    OpCase(
        "reshape",
        [{"op": "reshape", "shape": [2, -1, 3]}],
        [(4, 6)],
        [(2, 4, 3)],
        lambda xs, ts: [xs[0].reshape(2, 4, 3)],
    ),
    OpCase(
        "reshape-target",
        [{"op": "reshape", "shape": "target"}],
        [(4, 6)],
        [(24, 1)],
        lambda xs, ts: [xs[0].reshape(24, 1)],
    ),
    OpCase("scale", [{"op": "scale", "factor": 0.125}], [(3, 3)], [(3, 3)], lambda xs, ts: [xs[0] * 0.125]),
    OpCase("scale-int", [{"op": "scale", "factor": 2}], [(3, 3)], [(3, 3)], lambda xs, ts: [xs[0] * 2]),
    OpCase(
        "select_rows",
        [{"op": "select_rows", "index": [3, -1, 0, 3]}],
        [(10, 4)],
        [(4, 4)],
        lambda xs, ts: [xs[0][[3, 9, 0, 3]]],
    ),
    OpCase(
        "resize_rows-mean",
        [{"op": "resize_rows"}],
        [(5, 3)],
        [(8, 3)],
        lambda xs, ts: _grown(xs, ts, _mean_rows),
        torch.bfloat16,
    ),
    OpCase(
        "resize_rows-zeros",
        [{"op": "resize_rows", "init": "zeros"}],
        [(5, 3)],
        [(8, 3)],
        lambda xs, ts: _grown(xs, ts, lambda x, t: torch.zeros(3, 3)),
    ),
    OpCase(
        "resize_rows-target",
        [{"op": "resize_rows", "init": "target"}],
        [(5,)],
        [(8,)],
        lambda xs, ts: _grown(xs, ts, lambda x, t: t[5:]),
    ),
    OpCase("resize_rows-cut", [{"op": "resize_rows"}], [(8, 3)], [(5, 3)], lambda xs, ts: [xs[0][:5]]),
    OpCase(
        "permute_rope-weight",
        [{"op": "permute_rope", "heads": 2}],
        [(16, 8)],
        [(16, 8)],
        lambda xs, ts: [rope_reference(xs[0], 2)],
    ),
    OpCase(
        "permute_rope-bias",
        [{"op": "permute_rope", "heads": 4}],
        [(16,)],
        [(16,)],
        lambda xs, ts: [rope_reference(xs[0], 4)],
    ),
    OpCase(
        "unpermute_rope",
        [{"op": "unpermute_rope", "heads": 2}],
        [(16, 8)],
        [(16, 8)],
        lambda xs, ts: [xs[0].view(2, 2, 4, 8).transpose(1, 2).reshape(16, 8)],
    ),
    OpCase(
        "rope-then-cat",  # one op on each of three tensors, then fused: a Meta q, k, v into an HF qkv
        [{"op": "permute_rope", "heads": 2}, {"op": "cat"}],
        [(16, 8), (8, 8), (8, 8)],
        [(32, 8)],
        lambda xs, ts: [torch.cat([rope_reference(x, 2) for x in xs])],
    ),
    OpCase("resample_pos_embed", [{"op": "resample_pos_embed"}], [(1, 17, 8)], [(1, 37, 8)], _timm_pos(1)),
    OpCase(
        "resample_pos_embed-bilinear",
        [{"op": "resample_pos_embed", "prefix_tokens": 0, "mode": "bilinear"}],
        [(1, 16, 8)],
        [(1, 9, 8)],
        _timm_pos(0, "bilinear"),
    ),
]


def _target_tensors(case: OpCase) -> list[torch.Tensor]:
    return [seeded(*s, seed=100 + i, dtype=case.dtype) for i, s in enumerate(case.targets)]


def _run(case: OpCase, n_ops: int | None = None) -> tuple[list, list[torch.Tensor], list[torch.Tensor]]:
    """(the planned shapes, the tensors made, the target tensors) for the case's first `n_ops` ops."""
    ops = [make_op(o["op"], {k: v for k, v in o.items() if k != "op"}) for o in case.ops][:n_ops]
    inputs = [seeded(*s, seed=i, dtype=case.dtype) for i, s in enumerate(case.inputs)]
    targets = _target_tensors(case)
    names = [f"t{i}" for i in range(len(targets))]
    planned = run_shapes(ops, list(case.inputs), list(case.targets))
    made = run_ops(
        ops,
        inputs,
        list(zip(names, case.targets, strict=True)),
        dict(zip(names, targets, strict=True)).__getitem__,
    )
    return planned, made, targets


def test_the_op_cases_cover_every_op():
    assert {o["op"] for case in OP_CASES for o in case.ops} | {"resample_patch_embed"} == set(OPS)


@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c.id)
def test_planned_shapes_are_the_shapes_made(case):
    for n in range(1, len(case.ops) + 1):  # after each op, not only the last
        planned, made, _ = _run(case, n)
        assert [tuple(t.shape) for t in made] == planned[-1], case.ops[:n]
    assert planned[0] == list(case.inputs)
    assert planned[-1] == list(case.targets)


@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c.id)
def test_ops_make_the_reference_values(case):
    _, made, targets = _run(case)
    inputs = [seeded(*s, seed=i, dtype=case.dtype) for i, s in enumerate(case.inputs)]
    expected = case.expect(inputs, targets)
    assert len(made) == len(expected)
    for got, want in zip(made, expected, strict=True):
        assert got.dtype == case.dtype and got.is_contiguous()
        assert torch.equal(got, want.to(case.dtype)), case.id


def test_resize_rows_mean_is_the_float64_mean_cast_back():
    """Rows whose float32 mean cancels to 0: the new rows are the exact mean, 1/3, cast back."""
    x = torch.tensor([[1e8, 2.0], [1.0, 2.0], [-1e8, 2.0]] * 3)
    assert torch.equal(x.mean(0), torch.tensor([0.0, 2.0]))  # what float32 arithmetic gives
    (made,) = run_ops([make_op("resize_rows", {"init": "mean"})], [x], [("emb", (11, 2))])
    assert torch.equal(made[:9], x)
    assert torch.equal(made[9:], torch.tensor([[1 / 3, 2.0]] * 2))
    assert made.dtype == torch.float32


def test_resample_patch_embed_is_planned_to_the_target_kernel():
    op = make_op("resample_patch_embed", {})
    assert run_shapes([op], [(4, 3, 16, 16)], [(4, 3, 8, 8)])[-1] == [(4, 3, 8, 8)]
    (made,) = run_ops([op], [seeded(4, 3, 16, 16)], [("proj", (4, 3, 8, 8))])
    assert made.shape == (4, 3, 8, 8)


# == 2. the tensor ops against their references ========================================
@pytest.mark.parametrize("heads, rows, cols", [(1, 8, 4), (2, 16, 8), (4, 32, 3), (8, 64, 1), (3, 12, 0)])
def test_unpermute_rope_undoes_permute_rope_bit_for_bit(heads, rows, cols):
    w = seeded(rows, cols) if cols else seeded(rows)
    permuted = permute_rope(w, heads)
    assert torch.equal(permuted, rope_reference(w, heads))
    if rows // heads > 2:  # a head of one pair is its own permutation
        assert not torch.equal(permuted, w)
    assert torch.equal(
        run_ops([make_op("unpermute_rope", {"heads": heads})], [permuted], [("w", w.shape)])[0], w
    )


@pytest.mark.parametrize(
    "prefix, old, new, mode",
    [(1, 14, 24, "bicubic"), (5, 14, 24, "bicubic"), (1, 14, 24, "bilinear"), (1, 24, 14, "bicubic")],
    ids=["class-token", "class-and-4-registers", "bilinear", "down"],
)
def test_resample_pos_embed_equals_timm(prefix, old, new, mode):
    from timm.layers import resample_abs_pos_embed

    pos = seeded(1, prefix + old * old, 32)
    want = resample_abs_pos_embed(pos, [new, new], num_prefix_tokens=prefix, interpolation=mode)
    got = resample_pos_embed(pos, (1, prefix + new * new, 32), prefix, mode)
    assert torch.equal(got, want)
    assert torch.equal(got[:, :prefix], pos[:, :prefix])  # class and register tokens kept as they are
    op = make_op("resample_pos_embed", {"prefix_tokens": prefix, "mode": mode})
    assert torch.equal(run_ops([op], [pos], [("pos_embed", tuple(want.shape))])[0], want)


@pytest.mark.parametrize("new", [8, 14])
def test_resample_patch_embed_equals_timm(new):
    from timm.layers import resample_patch_embed as timm_resample

    kernel = seeded(6, 3, 16, 16)
    want = timm_resample(kernel, [new, new])
    got = resample_patch_embed(kernel, (new, new), "bicubic")
    assert got.shape == want.shape == (6, 3, new, new)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# == 3. a real port through the CLI: Meta-style layers into a fused-attention layout ====
HEADS, DIM, HIDDEN = 2, 8, 12


class MetaLayer(nn.Module):
    """Separate q, k, v (grouped-query: k and v have half q's rows), a GPT-2 `Conv1D`-style
    fused MLP weight stored [in, out], a norm."""

    def __init__(self):
        super().__init__()
        self.attention = nn.ModuleDict(
            {
                "wq": nn.Linear(DIM, 2 * DIM, bias=False),
                "wk": nn.Linear(DIM, DIM, bias=False),
                "wv": nn.Linear(DIM, DIM, bias=False),
            }
        )
        self.feed_forward = nn.Module()
        self.feed_forward.w13 = nn.Parameter(torch.randn(DIM, 2 * HIDDEN))
        self.attention_norm = nn.LayerNorm(DIM)
        nn.init.normal_(self.attention_norm.weight)
        nn.init.normal_(self.attention_norm.bias)


class MetaNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([MetaLayer(), MetaLayer()])
        self.rope = nn.Module()
        self.rope.register_buffer("freqs", torch.randn(4))
        self.rope.register_buffer("theta", torch.tensor(10000.0))  # a 0-d tensor
        self.head = nn.Linear(DIM, 3)


class FusedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(DIM, 4 * DIM, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(DIM, HIDDEN, bias=False)
        self.mlp.up = nn.Linear(DIM, HIDDEN, bias=False)
        self.norm = nn.LayerNorm(DIM)


class FusedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([FusedBlock(), FusedBlock()])
        self.head = nn.Linear(DIM, 3)


RULES = """\
[[rule]]  # a rename across every layer, two placeholders
from = "layers.{n}.attention_norm.{p}"
to = "blocks.{n}.norm.{p}"

[[rule]]  # many to one: the rotary layout, then q, k, v fused
from = ["layers.{n}.attention.wq.weight", "layers.{n}.attention.wk.weight", "layers.{n}.attention.wv.weight"]
to = "blocks.{n}.attn.qkv.weight"
ops = [{ op = "permute_rope", heads = "{heads}" }, { op = "cat", dim = 0 }]

[[rule]]  # one to many: a Conv1D weight transposed, then split
from = "layers.{n}.feed_forward.w13"
to = ["blocks.{n}.mlp.gate.weight", "blocks.{n}.mlp.up.weight"]
ops = [{ op = "transpose" }, { op = "split", dim = 0 }]

[[rule]]  # dropped on purpose, every key under rope.
from = "rope.{buffer}"
to = []
"""


def expected_state(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fused model's state computed by hand from the source's."""
    out = {}
    for n in range(2):
        a = f"layers.{n}.attention."
        qkv = [rope_reference(src[a + f"{w}.weight"], HEADS) for w in ("wq", "wk", "wv")]
        out[f"blocks.{n}.attn.qkv.weight"] = torch.cat(qkv)
        gate, up = src[f"layers.{n}.feed_forward.w13"].T.split(HIDDEN)
        out[f"blocks.{n}.mlp.gate.weight"], out[f"blocks.{n}.mlp.up.weight"] = gate, up
        for p in ("weight", "bias"):
            out[f"blocks.{n}.norm.{p}"] = src[f"layers.{n}.attention_norm.{p}"]
    out["head.weight"], out["head.bias"] = src["head.weight"], src["head.bias"]
    return out


@dataclass(frozen=True)
class Case:
    """A folder with the source (torch.save of a seeded MetaNet), the target as a template
    (torch.save of a FusedNet's state_dict) and a rule file."""

    folder: Path
    src: Path
    target: Path
    rules: Path
    state: dict[str, torch.Tensor] = field(repr=False)

    def inputs(self) -> dict[str, str]:
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (self.src, self.target, self.rules)
        }


def make_case(folder: Path) -> Case:
    torch.manual_seed(13)
    src, target = folder / "meta.pth", folder / "fused.pth"
    state = MetaNet().state_dict()
    torch.save(state, src)
    torch.save(FusedNet().state_dict(), target)
    rules = folder / "rules.toml"
    rules.write_text(RULES)
    return Case(folder, src, target, rules, state)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    """Shared by the tests that only read it: they write into their own tmp_path."""
    return make_case(tmp_path_factory.mktemp("rules"))


@dataclass(frozen=True)
class Ported:
    out: Path
    plan: Path
    doc: dict[str, Any]


@pytest.fixture(scope="module")
def ported(case, tmp_path_factory) -> Ported:
    """`surgery port meta.pth --to fused.pth --map rules.toml --map-arg heads=2 --verify --plan-out --json`."""
    folder = tmp_path_factory.mktemp("ported")
    out, plan = folder / "fused.safetensors", folder / "plan.json"
    run = run_cli(
        "port", case.src, "--to", case.target, "--map", case.rules, "--map-arg", f"heads={HEADS}",
        "-o", out, "--plan-out", plan, "--verify", "--json",
    )  # fmt: skip
    assert run.exit_code == 0, (run.stdout[-3000:], run.stderr)
    return Ported(out, plan, json.loads(run.stdout))


def assert_tensors_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


def test_rule_port_writes_the_hand_computed_tensors(case, ported):
    written = load_file(ported.out)
    assert sorted(written) == sorted(FusedNet().state_dict())  # the target's keys, no more
    assert_tensors_equal(written, expected_state(case.state))
    doc = ported.doc
    assert doc["written"] is True and doc["verified"] == len(written)
    assert doc["missing"] == doc["unexpected"] == doc["mismatched"] == []
    assert doc["unused"] == ["rope.freqs", "rope.theta"]
    assert {m["target"]: m["how"] for m in doc["matched"]}["head.weight"] == "exact"  # no rule takes it


def test_rule_port_json_has_each_binding_with_ops_and_shapes(ported):
    derived = {(d["rule"], tuple(d["binding"].values())): d for d in ported.doc["derived"]}
    assert sorted(derived) == sorted(
        [("rules.toml rule 1", (n, p)) for n in "01" for p in ("bias", "weight")]
        + [(f"rules.toml rule {r}", (n,)) for r in (2, 3) for n in "01"]
    )
    fuse = derived["rules.toml rule 2", ("1",)]
    assert fuse["binding"] == {"n": "1"}
    assert fuse["from"] == [f"layers.1.attention.{w}.weight" for w in ("wq", "wk", "wv")]
    assert fuse["to"] == ["blocks.1.attn.qkv.weight"]
    assert fuse["ops"] == [{"op": "permute_rope", "heads": HEADS}, {"op": "cat", "dim": 0}]
    assert fuse["shapes"] == [[[16, 8], [8, 8], [8, 8]], [[16, 8], [8, 8], [8, 8]], [[32, 8]]]
    split = derived["rules.toml rule 3", ("0",)]
    assert split["ops"] == [
        {"op": "transpose", "dim0": 0, "dim1": 1},
        {"op": "split", "dim": 0, "sizes": None},
    ]
    assert split["shapes"] == [[[8, 24]], [[24, 8]], [[12, 8], [12, 8]]]
    rename = derived["rules.toml rule 1", ("0", "weight")]
    assert rename["binding"] == {"n": "0", "p": "weight"}
    assert rename["ops"] == [] and rename["to"] == ["blocks.0.norm.weight"]


def test_rule_port_metadata_holds_the_map(ported):
    with safe_open(str(ported.out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["surgery.map"]) == ported.doc["derived"]
    assert json.loads(meta["surgery.rules"])["map"] == ["rules.toml"]


def test_dry_run_shows_every_op_with_its_shapes(case, tmp_path):
    out = tmp_path / "out.safetensors"
    run = run_cli(
        "port",
        case.src,
        "--to",
        case.target,
        "--map",
        case.rules,
        "--map-arg",
        "heads=2",
        "-o",
        out,
        "--dry-run",
    )
    assert run.exit_code == 0, run.stderr
    text = " ".join(run.stdout.split())
    assert "rule 1: layers.{n}.attention_norm.{p} -> blocks.{n}.norm.{p} (4 bindings)" in text
    assert (
        "rule 2: [layers.{n}.attention.wq.weight, layers.{n}.attention.wk.weight, layers.{n}.attention.wv.weight] "
        "-> blocks.{n}.attn.qkv.weight (2 bindings): [16, 8] + [8, 8] + [8, 8] -> permute_rope(heads=2) "
        "-> [16, 8] + [8, 8] + [8, 8] -> cat(dim=0) -> [32, 8]"
    ) in text
    assert (
        "rule 3: layers.{n}.feed_forward.w13 -> [blocks.{n}.mlp.gate.weight, blocks.{n}.mlp.up.weight] "
        "(2 bindings): [8, 24] -> transpose(dim0=0, dim1=1) -> [24, 8] -> split(dim=0, sizes=None) -> [12, 8] x2"
    ) in text
    assert "unused 2: rope.{freqs,theta}" in text
    assert not out.exists() and os.listdir(tmp_path) == []


def test_plan_out_then_plan_writes_the_same_tensors(case, ported, tmp_path):
    plan = json.loads(ported.plan.read_text())
    assert not re.search(r"\{[A-Za-z_]", json.dumps(plan["rules"]))  # resolved: no placeholder left
    assert {"from": ["layers.0.attention.wq.weight", "layers.0.attention.wk.weight", "layers.0.attention.wv.weight"],
            "to": ["blocks.0.attn.qkv.weight"],
            "ops": [{"op": "permute_rope", "heads": 2}, {"op": "cat", "dim": 0}]} in plan["rules"]  # fmt: skip
    for name in ("rope.freqs", "rope.theta"):  # a strict port of the plan drops them too
        assert {"from": [name], "to": [], "ops": []} in plan["rules"]
    out = tmp_path / "again.safetensors"
    run = run_cli("port", case.src, "--to", case.target, "--plan", ported.plan, "-o", out, "--verify")
    assert run.exit_code == 0, (run.stdout[-3000:], run.stderr)
    first, again = load_file(ported.out), load_file(out)
    assert sorted(first) == sorted(again)
    for name in first:
        assert first[name].numpy().tobytes() == again[name].numpy().tobytes(), name


def test_recipe_file_names_the_rules_and_their_args(case, tmp_path, monkeypatch):
    """`map = "rules.toml"` and `map_args = { heads = 2 }`, run from the folder the recipe names files in."""
    for p in (case.src, case.target, case.rules):
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "recipe.toml").write_text(
        'source = "meta.pth"\nto = "fused.pth"\nout = "fused.safetensors"\n'
        'map = "rules.toml"\nmap_args = { heads = 2 }\nverify = true\n'
    )
    monkeypatch.chdir(tmp_path)  # every name in the recipe is relative to it
    run = run_cli("port", "--recipe", "recipe.toml")
    assert run.exit_code == 0, (run.stdout[-3000:], run.stderr)
    assert_tensors_equal(load_file(tmp_path / "fused.safetensors"), expected_state(case.state))


def test_a_reviewed_plan_with_rules_loads_their_tensors(case, ported, tmp_path):
    """The plan's rules fill target keys its mapping does not name: judged against the whole target."""
    out = tmp_path / "again.safetensors"
    run = run_cli(
        "port", case.src, "--to", case.target, "--plan", ported.plan, "--strict", "false", "-o", out
    )
    assert run.exit_code == 0, (run.stdout[-3000:], run.stderr)
    assert_tensors_equal(load_file(out), expected_state(case.state))


def test_a_plan_with_a_misfit_rule_is_applied_as_it_was_made(case, tmp_path):
    """A rule output of another shape is mismatched, not loaded; the plan's rules make it again,
    so the mapping does not name it (it named the rule's output, which --plan refused as unknown)."""
    rules = tmp_path / "rules.toml"
    rules.write_text(
        with_rule(3, f'from = "layers.{{n}}.feed_forward.w13"\nto = {MLP}\nops = [{{ op = "split" }}]')
    )
    first, again, plan = (
        tmp_path / "first.safetensors",
        tmp_path / "again.safetensors",
        tmp_path / "plan.json",
    )
    flags = ("--to", case.target, "--strict", "false", "--json")
    run = run_cli(
        "port", case.src, *flags, "--map", rules, "--map-arg", "heads=2", "-o", first, "--plan-out", plan
    )
    assert run.exit_code == 0, run.stderr
    mismatched = json.loads(run.stdout)["mismatched"]
    assert [m["target"] for m in mismatched] == [
        f"blocks.{n}.mlp.{w}.weight" for n in "01" for w in ("gate", "up")
    ]
    assert json.loads(plan.read_text())["mapping"] == {"head.weight": "head.weight", "head.bias": "head.bias"}
    run = run_cli("port", case.src, *flags, "--plan", plan, "-o", again)
    assert run.exit_code == 0, run.stderr
    again_mismatched = json.loads(run.stdout)["mismatched"]
    assert [m.pop("reason") for m in again_mismatched] == ["made by plan.json rule 7", "made by plan.json rule 7",
                                                          "made by plan.json rule 8", "made by plan.json rule 8"]  # fmt: skip
    assert again_mismatched == [{k: v for k, v in m.items() if k != "reason"} for m in mismatched]
    assert_tensors_equal(load_file(again), load_file(first))


# == 4. bad rule files: one line naming the file, the rule and the binding; nothing written ==
QKV = '["layers.{n}.attention.wq.weight", "layers.{n}.attention.wk.weight", "layers.{n}.attention.wv.weight"]'


def with_rule(n: int, body: str) -> str:
    """RULES with its n-th rule replaced by `body`."""
    blocks = RULES.split("[[rule]]")
    blocks[n] = "\n" + body + "\n\n"
    return "[[rule]]".join(blocks)


@dataclass(frozen=True)
class Bad:
    id: str
    rules: str | None  # the rule file's text; None: no file
    where: str  # "rules": the rule file; "src": the checkpoint; else the literal `where`
    says: tuple[str, ...]
    code: int = 2
    args: tuple[str, ...] = ()  # after --map rules.toml --map-arg heads=2
    map: bool = True


MLP = '["blocks.{n}.mlp.gate.weight", "blocks.{n}.mlp.up.weight"]'
FUSE_OPS = 'ops = [{ op = "permute_rope", heads = "{heads}" }, { op = "cat", dim = 0 }]'
BAD_RULES = [
    Bad("not-toml", "[[rule]\nfrom = ", "rules", ("not a TOML file",)),
    Bad(
        "unknown-top-level-field",
        RULES + '\n[[rules]]\nfrom = "a"\nto = "b"\n',
        "rules",
        ("unknown field 'rules'",),
    ),
    Bad(
        "unknown-rule-field",
        with_rule(2, f'form = {QKV}\nto = "x"'),
        "rules",
        ("rule 2: unknown field 'form'",),
    ),
    Bad(
        "unknown-op",
        with_rule(2, f'from = {QKV}\nto = "x"\nops = [{{ op = "tranpose" }}]'),
        "rules",
        ("rule 2: unknown op 'tranpose'",),
    ),
    Bad(
        "op-import",
        with_rule(2, f'from = {QKV}\nto = "x"\nops = [{{ op = "__import__", name = "canary" }}]'),
        "rules",
        ("rule 2: unknown op '__import__'",),
    ),
    Bad(
        "op-eval",
        with_rule(2, f'from = {QKV}\nto = "x"\nops = [{{ op = "eval", source = "open(\'pwned\', \'w\')" }}]'),
        "rules",
        ("rule 2: unknown op 'eval'",),
    ),
    Bad(
        "op-module",
        with_rule(2, f'from = {QKV}\nto = "x"\nops = [{{ op = "canary" }}]'),
        "rules",
        ("rule 2: unknown op 'canary'",),
    ),
    Bad(
        "op-dotted",
        with_rule(2, f'from = {QKV}\nto = "x"\nops = [{{ op = "canary.run" }}]'),
        "rules",
        ("rule 2: unknown op 'canary.run'",),
    ),
    Bad(
        "unknown-op-parameter",
        with_rule(2, f'from = {QKV}\nto = "x"\nops = [{{ op = "cat", axis = 0 }}]'),
        "rules",
        ("rule 2: cat: unknown parameter 'axis'",),
    ),
    Bad(
        "wrong-parameter-type",
        with_rule(2, f'from = {QKV}\nto = "x"\nops = [{{ op = "cat", dim = "0" }}]'),
        "rules",
        ("rule 2: cat: dim='0' is not an integer",),
    ),
    Bad(
        "unbound-placeholder",
        with_rule(2, f'from = {QKV}\nto = "blocks.{{m}}.attn.qkv.weight"\n{FUSE_OPS}'),
        "rules",
        ("rule 2: {m} in to",),
    ),
    Bad(
        "matches-nothing",
        with_rule(2, 'from = "encoder.{n}.qkv.weight"\nto = "blocks.{n}.attn.qkv.weight"'),
        "src",
        ("rules.toml rule 2: from 'encoder.{n}.qkv.weight' matches no source key",),
        1,
    ),
    Bad(
        "second-source-missing",
        with_rule(
            2,
            'from = ["layers.{n}.attention.wq.weight", "layers.{n}.attention.wx.weight"]\n'
            f'to = "blocks.{{n}}.attn.qkv.weight"\n{FUSE_OPS}',
        ),
        "src",
        ("rules.toml rule 2 (n=0): no source key 'layers.0.attention.wx.weight'",),
        1,
    ),
    Bad(
        "target-key-missing",
        with_rule(2, f'from = {QKV}\nto = "blocks.{{n}}.attn.fused.weight"\n{FUSE_OPS}'),
        "src",
        ("rules.toml rule 2 (n=0): the target has no key 'blocks.0.attn.fused.weight'",),
        1,
    ),
    Bad(
        "source-taken-twice",
        with_rule(2, 'from = "layers.{n}.attention_norm.weight"\nto = "blocks.{n}.norm.bias"'),
        "src",
        (
            "rules.toml rule 2 (n=0): 'layers.0.attention_norm.weight' is already taken by rules.toml rule 1 (n=0, p=weight)",
        ),
        1,
    ),
    Bad(
        "shapes-do-not-fit",
        with_rule(
            2,
            'from = ["layers.{n}.attention.wq.weight", "layers.{n}.attention.wk.weight"]\n'
            f'to = "blocks.{{n}}.attn.qkv.weight"\n{FUSE_OPS}',
        ),
        "src",
        (
            "port refused: rules.toml rule 2 (n=0) makes [24, 8] for blocks.0.attn.qkv.weight [32, 8] (and 1 more); ",
        ),
        1,
    ),
    Bad(
        "transpose-forgotten",
        with_rule(
            3, f'from = "layers.{{n}}.feed_forward.w13"\nto = {MLP}\nops = [{{ op = "split", dim = 0 }}]'
        ),
        "src",
        (
            "strict port refused: rules.toml rule 3 (n=0) makes [4, 24] for blocks.0.mlp.gate.weight [12, 8] (and 3 more); ",
        ),
        1,
    ),
    Bad(
        "split-sizes-do-not-add-up",
        with_rule(
            3,
            f'from = "layers.{{n}}.feed_forward.w13"\nto = {MLP}\nops = [{{ op = "transpose" }}, {{ op = "split", sizes = [10, 10] }}]',
        ),
        "src",
        (
            "rules.toml rule 3 (n=0): split(dim=0): sizes [10, 10] do not add up to 24",
            "(sources layers.0.feed_forward.w13 [8, 24], targets blocks.0.mlp.gate.weight [12, 8], blocks.0.mlp.up.weight [12, 8])",
        ),
        1,
    ),
    Bad(
        "no-value",
        with_rule(
            2, f'from = {QKV}\nto = "blocks.{{n}}.attn.qkv.weight"\n{FUSE_OPS.replace("heads}", "x}")}'
        ),
        "src",
        ("rules.toml rule 2 (n=0): no value for {x}",),
        1,
    ),
    Bad("no-such-rule-file", None, "rules", ("no such rule file",)),
    Bad("no-such-preset", RULES, "nosuch", ("no such preset",), 2, ("--preset", "nosuch"), map=False),
    # each of these was a traceback (internal error, exit 3) or a crash while writing
    Bad(
        "from-placeholders-differ",
        with_rule(
            2,
            f'from = ["layers.{{n}}.attention.wq.weight", "layers.{{m}}.attention.wk.weight"]\nto = "blocks.{{n}}.attn.qkv.weight"\n{FUSE_OPS}',
        ),
        "rules",
        ("rule 2: {m} in from 'layers.{m}.attention.wk.weight'",),
    ),
    Bad(
        "split-sizes-not-numbers",
        with_rule(
            3,
            f'from = "layers.{{n}}.feed_forward.w13"\nto = {MLP}\nops = [{{ op = "transpose" }}, {{ op = "split", sizes = ["12", "12"] }}]',
        ),
        "src",
        ("rules.toml rule 3 (n=0): split(dim=0): sizes=['12', '12'] is not a list of sizes",),
        1,
    ),
    Bad(
        "reshape-negative-sizes",
        with_rule(
            1,
            'from = "layers.{n}.attention_norm.{p}"\nto = "blocks.{n}.norm.{p}"\nops = [{ op = "reshape", shape = [-2, -4] }, { op = "reshape", shape = "target" }]',
        ),
        "src",
        ("rules.toml rule 1 (n=0, p=bias): reshape: shape=[-2, -4] is not a list of sizes",),
        1,
    ),
    Bad(
        "unstack-0-d",
        with_rule(4, 'from = "rope.theta"\nto = "head.bias"\nops = [{ op = "unstack" }]'),
        "src",
        ("rules.toml rule 4: unstack: dim=0 is out of range for a tensor of shape []",),
        1,
    ),
    Bad(
        "heads-none",
        RULES,
        "src",
        ("rules.toml rule 2 (n=0): permute_rope: heads=None is not an integer",),
        1,
        ("--map-arg", "heads=None"),
    ),
]


@pytest.mark.parametrize("bad", BAD_RULES, ids=lambda b: b.id)
def test_bad_rule_file_is_one_line_and_writes_nothing(bad, case, tmp_path, monkeypatch):
    """Run from a folder holding `canary.py` (which would leave a file if imported) so that an op
    naming a module or a builtin could only be found by importing or evaluating it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "canary.py").write_text(
        "open('imported', 'w').close()\ndef run(*a, **k):\n    open('ran', 'w').close()\n"
    )
    rules = tmp_path / "rules.toml"
    if bad.rules is not None:
        rules.write_text(bad.rules)
    before, listed = case.inputs(), sorted(os.listdir(tmp_path))
    out = tmp_path / "out.safetensors"
    map_flags = ("--map", rules) if bad.map else ()
    run = run_cli(
        "port", case.src, "--to", case.target, *map_flags, "--map-arg", "heads=2", *bad.args, "-o", out
    )
    where = {"rules": rules, "src": case.src}.get(bad.where, bad.where)
    line = assert_clean_error(run, where, code=bad.code)
    for text in bad.says:
        assert text in line, line
    assert sorted(os.listdir(tmp_path)) == listed  # no output, no temp file, no canary
    assert case.inputs() == before


@pytest.mark.parametrize(
    "op, inputs, targets, says",
    [
        ({"op": "cat"}, [(), ()], [(2,)], "cat: dim=0 is out of range for a tensor of shape []"),
        ({"op": "split"}, [()], [(), ()], "split: dim=0 is out of range for a tensor of shape []"),
        (
            {"op": "split", "sizes": [1.5, 2.5]},
            [(4,)],
            [(2,), (2,)],
            "sizes=[1.5, 2.5] is not a list of sizes",
        ),
        ({"op": "split", "sizes": [True, 3]}, [(4,)], [(1,), (3,)], "sizes=[True, 3] is not a list of sizes"),
        ({"op": "reshape", "shape": [-2, -8]}, [(4, 4)], [(2, 8)], "shape=[-2, -8] is not a list of sizes"),
        ({"op": "select_rows", "index": [True, False]}, [(4, 3)], [(2, 3)], "is not a list of row numbers"),
        (
            {"op": "resample_pos_embed", "prefix_tokens": -1},
            [(1, 3, 4)],
            [(1, 8, 4)],
            "prefix_tokens=-1 is not a count",
        ),
    ],
    ids=[
        "cat-0-d",
        "split-0-d",
        "split-float-sizes",
        "split-bool-sizes",
        "reshape-negative",
        "bool-rows",
        "negative-prefix",
    ],
)
def test_ops_refuse_what_they_cannot_make(op, inputs, targets, says):
    """Each of these was planned (or crashed with an IndexError or a TypeError) and failed while writing."""
    made = make_op(op["op"], {k: v for k, v in op.items() if k != "op"})
    with pytest.raises(OpError, match=re.escape(says)):
        run_shapes([made], inputs, targets)


@pytest.mark.parametrize(
    "op, param",
    [("permute_rope", "heads"), ("transpose", "dim0"), ("scale", "factor"), ("resample_pos_embed", "mode")],
)
def test_a_placeholder_resolved_to_none_is_refused(op, param):
    """`--map-arg heads=None` is None: only a parameter whose default is None may be None."""
    doc = {"rule": [{"from": "a", "to": "b", "ops": [{"op": op, param: "{x}"}]}]}
    rules = rules_from_doc(doc, "rules.toml")  # the placeholder's type is checked once it has a value
    entries = [Entry("a", (1, 8, 4), "float32")], [Entry("b", (1, 8, 4), "float32")]
    with pytest.raises(RuleError, match=re.escape(f"rules.toml rule 1: {op}: {param}=None is not")):
        plan_rules([rules], *entries, {"x": None})
    assert (
        make_op("split", {"sizes": None})["sizes"] is None
    )  # its default: equal parts or the targets' sizes


def test_rule_file_args_are_defaults_that_map_args_override(case, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES + "\n[args]\nheads = 2\n")
    out, four = tmp_path / "out.safetensors", tmp_path / "four.safetensors"
    assert run_cli("port", case.src, "--to", case.target, "--map", rules, "-o", out).exit_code == 0
    assert_tensors_equal(load_file(out), expected_state(case.state))
    run = run_cli("port", case.src, "--to", case.target, "--map", rules, "--map-arg", "heads=4", "-o", four)
    assert run.exit_code == 0, run.stderr
    a = "layers.0.attention."
    want = torch.cat([rope_reference(case.state[a + f"{w}.weight"], 4) for w in ("wq", "wk", "wv")])
    assert torch.equal(load_file(four)["blocks.0.attn.qkv.weight"], want)


def test_a_placeholder_may_stand_for_a_list(case, tmp_path):
    """Classes reordered by `select_rows(index="{order}")`, the order given on the command line."""
    rules = tmp_path / "rules.toml"
    rules.write_text(
        RULES
        + '\n[[rule]]\nfrom = "head.{p}"\nto = "head.{p}"\nops = [{ op = "select_rows", index = "{order}" }]\n'
    )
    out = tmp_path / "out.safetensors"
    run = run_cli(
        "port",
        case.src,
        "--to",
        case.target,
        "--map",
        rules,
        "--map-arg",
        "heads=2",
        "--map-arg",
        "order=[2, 0, 1]",
        "-o",
        out,
        "--json",
    )
    assert run.exit_code == 0, run.stderr
    written = load_file(out)
    for p in ("weight", "bias"):
        assert torch.equal(written[f"head.{p}"], case.state[f"head.{p}"][[2, 0, 1]])
    ops = {d["to"][0]: d["ops"] for d in json.loads(run.stdout)["derived"]}
    assert ops["head.bias"] == [{"op": "select_rows", "index": [2, 0, 1]}]


def test_an_optional_rule_may_match_nothing(case, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(
        RULES
        + '\n[[rule]]\nfrom = "encoder.{n}.qkv.weight"\nto = "blocks.{n}.attn.qkv.weight"\noptional = true\n'
    )
    out = tmp_path / "out.safetensors"
    run = run_cli("port", case.src, "--to", case.target, "--map", rules, "--map-arg", "heads=2", "-o", out)
    assert run.exit_code == 0, run.stderr
    assert_tensors_equal(load_file(out), expected_state(case.state))


@pytest.mark.parametrize("flag", ["-o", "--plan-out"])
def test_the_rule_file_is_an_input_never_overwritten(case, tmp_path, flag):
    rules = tmp_path / "rules.toml"
    shutil.copy(case.rules, rules)
    other = ("--plan-out", tmp_path / "plan.json") if flag == "-o" else ("-o", tmp_path / "out.safetensors")
    run = run_cli(
        "port",
        case.src,
        "--to",
        case.target,
        "--map",
        rules,
        "--map-arg",
        "heads=2",
        flag,
        rules,
        *other,
        "--force",
    )
    assert_clean_error(run, rules, contains="the output is an input of this run", code=2)
    assert rules.read_text() == RULES and os.listdir(tmp_path) == ["rules.toml"]


def test_the_plan_file_is_an_input_never_overwritten(case, ported, tmp_path):
    plan = tmp_path / "plan.json"
    shutil.copy(ported.plan, plan)
    before = plan.read_bytes()
    run = run_cli("port", case.src, "--to", case.target, "--plan", plan, "-o", plan, "--force")
    assert_clean_error(run, plan, contains="the output is an input of this run", code=2)
    assert plan.read_bytes() == before and os.listdir(tmp_path) == ["plan.json"]


def test_plan_and_map_together_are_refused(case, ported, tmp_path):
    out = tmp_path / "out.safetensors"
    run = run_cli(
        "port", case.src, "--to", case.target, "--plan", ported.plan, "--map", case.rules, "-o", out
    )
    assert_clean_error(run, "--plan", contains="drop --map", code=2)
    assert os.listdir(tmp_path) == []


# == 5. the library ===================================================================
def test_library_port_with_rules_loads_the_same_values(case):
    model = FusedNet()
    report = surgery.port(case.src, into=model, strict=True, map=[case.rules], map_args={"heads": HEADS})
    assert (
        report.plan.complete
        and len(report.plan.derived) == 8
        and report.plan.unused == ("rope.freqs", "rope.theta")
    )
    assert_tensors_equal(dict(model.state_dict()), expected_state(case.state))
    again = FusedNet()
    surgery.port(str(case.src), into=again, strict=True, map=case.rules, map_args={"heads": HEADS})
    assert_tensors_equal(dict(again.state_dict()), expected_state(case.state))


def test_map_args_without_rules_are_refused(tmp_path):
    """Values for rules' parameters with no rules to take them are a mistake, not a no-op."""
    from surgery.errors import BadArgument

    path = tmp_path / "tiny.pth"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    run = run_cli(
        "port",
        path,
        "--to",
        "torch.nn:Linear?in_features=2&out_features=2",
        "--map-arg",
        "heads=2",
        "-o",
        tmp_path / "out.safetensors",
    )
    assert_clean_error(run, "--map-arg", code=2, contains="no rules")
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(BadArgument, match="map_args"):
        surgery.port(path, into=nn.Linear(2, 2), map_args={"heads": 2})
