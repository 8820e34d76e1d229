"""`surgery port --adapt`: shape adaptation without writing rules (plans.adapt), held to the
libraries that adapt on load themselves.

Real models, seeded and tiny: timm ViTs at another image size (timm's own
`resample_abs_pos_embed` and `checkpoint_filter_fn` are the reference), with register tokens,
with another patch size (`resample_patch_embed`); a transformers GPT-2 with a tied `lm_head`
whose vocabulary grows or shrinks; a torchvision resnet18 into 10 classes. And the tensors
`--adapt` must leave alone: a conv, a norm, an MLP layer of another width, a position or
token-type table with more rows, a 3-D tensor not named like a position embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli
from safetensors.torch import load_file, save_file

import surgery
from surgery.plans.adapt import position_grids

timm = pytest.importorskip("timm")
TINY_VIT = "depth=2&embed_dim=32&num_heads=2&num_classes=10"


def vit_spec(img: int | tuple[int, int], patch: int, extra: str = "") -> str:
    size = f"({img[0]},{img[1]})" if isinstance(img, tuple) else img
    return f"timm:vit_tiny_patch16_224?img_size={size}&patch_size={patch}&{TINY_VIT}{extra}"


def vit(img: int | tuple[int, int], patch: int, **kwargs) -> torch.nn.Module:
    """The model `vit_spec` names, built as the port builds it (for timm's own load path)."""
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=img,
        patch_size=patch,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=10,
        **kwargs,
    )


def port_json(*args: object) -> tuple[object, dict]:
    run = run_cli("port", *args, "--json")
    assert run.stdout.startswith("{"), run
    return run, json.loads(run.stdout)


def reasons(report: dict) -> dict[str, str | None]:
    return {m["target"]: m.get("reason") for m in report["mismatched"]}


@pytest.fixture(scope="module")
def vits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seeded tiny timm ViTs saved with torch.save (and one with safetensors)."""
    folder = tmp_path_factory.mktemp("vits")
    made = {
        "cls": ({}, 32, 8),  # pos_embed [1, 1 + 4*4, 32]
        "reg": ({"reg_tokens": 4, "no_embed_class": True}, 32, 8),  # as vit_*_reg: [1, 4*4, 32]
        "reg_in_pos": ({"reg_tokens": 4}, 32, 8),  # class and register tokens in pos_embed: [1, 5 + 16, 32]
        "patch16": ({}, 64, 16),
    }
    out = {}
    for i, (name, (kwargs, img, patch)) in enumerate(made.items()):
        torch.manual_seed(i)
        state = vit(img, patch, **kwargs).state_dict()
        out[name] = folder / f"{name}.pth"
        torch.save(state, out[name])
    save_file(torch.load(out["cls"], weights_only=True), folder / "cls.safetensors")
    out["cls.safetensors"] = folder / "cls.safetensors"
    return out


# -- position embeddings ------------------------------------------------------------
@pytest.mark.parametrize("saved", ["cls", "cls.safetensors"])
def test_a_position_grid_refused_without_adapt_says_what_adapt_would_do(vits, tmp_path, saved):
    out = tmp_path / "out.safetensors"
    run, report = port_json(vits[saved], "--to", vit_spec(48, 8), "-o", out)
    assert_clean_error(run, vits[saved], contains="strict port refused", code=1)
    assert reasons(report) == {"pos_embed": "--adapt: the position grid 4x4 -> 6x6 (1 prefix token kept)"}
    assert report["hints"][0] == "--adapt would adapt 1 mismatched tensors"
    assert "--adapt would adapt 1 mismatched tensors" in run.stderr
    assert not out.exists()


@pytest.mark.parametrize("saved", ["cls", "cls.safetensors"])
def test_adapt_resamples_pos_embed_exactly_as_timm(vits, tmp_path, saved):
    out = tmp_path / "out.safetensors"
    run, report = port_json(vits[saved], "--to", vit_spec(48, 8), "-o", out, "--adapt")
    assert run.exit_code == 0, run
    assert report["mismatched"] == [] and report["written"]
    (derived,) = report["derived"]
    assert derived["ops"] == [{"op": "resample_pos_embed", "prefix_tokens": 1, "mode": "bicubic"}]
    assert derived["shapes"] == [[[1, 17, 32]], [[1, 37, 32]]]
    assert "--adapt pos_embed: the position grid 4x4 -> 6x6 (1 prefix token kept)" in report["steps"]
    source, written = torch.load(vits["cls"], weights_only=True), load_file(out)
    expected = timm.layers.resample_abs_pos_embed(source["pos_embed"], new_size=(6, 6), num_prefix_tokens=1)
    assert torch.equal(written["pos_embed"], expected)
    assert written.keys() == source.keys()
    assert all(torch.equal(written[k], v) for k, v in source.items() if k != "pos_embed")
    # timm's own load path agrees on every tensor, and the model takes the file as it is
    target = vit(48, 8)
    filtered = timm.models.vision_transformer.checkpoint_filter_fn(source, target)
    assert all(torch.equal(written[k], v) for k, v in filtered.items())
    target.load_state_dict(written)


@pytest.mark.parametrize(
    ("saved", "kwargs", "prefix"),
    [
        ("reg", "&reg_tokens=4&no_embed_class=True", 0),  # the tokens are not in pos_embed: a bare grid
        ("reg_in_pos", "&reg_tokens=4", 5),
    ],
)
def test_adapt_counts_register_tokens_as_timm_lays_pos_embed_out(vits, tmp_path, saved, kwargs, prefix):
    out = tmp_path / "out.safetensors"
    run, report = port_json(vits[saved], "--to", vit_spec(48, 8, kwargs), "-o", out, "--adapt")
    assert run.exit_code == 0, run
    assert report["derived"][0]["ops"][0]["prefix_tokens"] == prefix
    source, written = torch.load(vits[saved], weights_only=True), load_file(out)
    expected = timm.layers.resample_abs_pos_embed(source["pos_embed"], (6, 6), num_prefix_tokens=prefix)
    assert torch.equal(written["pos_embed"], expected)
    assert torch.equal(written["reg_token"], source["reg_token"])
    target = vit(48, 8, reg_tokens=4, no_embed_class=prefix == 0)
    filtered = timm.models.vision_transformer.checkpoint_filter_fn(source, target)
    assert all(torch.equal(written[k], v) for k, v in filtered.items())


def test_adapt_resamples_into_a_template_by_the_shapes_alone(vits, tmp_path):
    """No module to ask (a checkpoint as the target): the prefix is the fewest tokens that
    leave both sides a square grid."""
    template = tmp_path / "template.safetensors"
    save_file(vit(48, 8, reg_tokens=4).state_dict(), template)
    out = tmp_path / "out.safetensors"
    run = run_cli("port", vits["reg_in_pos"], "--to", template, "-o", out, "--adapt")
    assert run.exit_code == 0, run
    source = torch.load(vits["reg_in_pos"], weights_only=True)
    expected = timm.layers.resample_abs_pos_embed(source["pos_embed"], (6, 6), num_prefix_tokens=5)
    assert torch.equal(load_file(out)["pos_embed"], expected)


@pytest.mark.parametrize("adapt", [(), ("--adapt",)])
@pytest.mark.parametrize("as_template", [False, True])
def test_a_grid_that_is_not_square_stays_mismatched(vits, tmp_path, adapt, as_template):
    """img_size (32, 48): a 4x6 grid. Its 1 + 24 tokens are a 3x3 'grid' after 16 prefix
    tokens, which a guess from the shapes took (a 1x1 grid resampled to 3x3). The module's
    own grid says no square grid fits; a template, with no module to ask, needs a real grid
    (2x2 at least) on both sides. Nothing is adapted and nothing claims it would be."""
    target = vit_spec((32, 48), 8)
    if as_template:
        target = tmp_path / "template.safetensors"
        save_file(vit((32, 48), 8).state_dict(), target)
    run, report = port_json(vits["cls"], "--to", target, "--dry-run", *adapt)
    assert run.exit_code == 1
    assert reasons(report) == {"pos_embed": None}
    assert report["derived"] == [] and report["hints"] == []


def test_position_grids_are_read_from_the_patch_embedding_beside_them():
    assert position_grids(vit(48, 8)) == {"pos_embed": (6, 6)}
    assert position_grids(vit((32, 48), 8, reg_tokens=4, no_embed_class=True)) == {"pos_embed": (4, 6)}
    cait = timm.create_model(
        "cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2
    )
    assert cait.pos_embed.shape[1] == 16 and cait.num_prefix_tokens == 1  # timm's count is not the layout
    assert position_grids(cait) == {"pos_embed": (4, 4)}
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    assert position_grids(transformers.ViTModel(config)) == {"embeddings.position_embeddings": (4, 4)}
    assert position_grids(torch.nn.Linear(2, 2)) == {}


# -- patch embeddings -----------------------------------------------------------------
def test_adapt_resamples_a_patch_kernel_as_timm(vits, tmp_path):
    """img 64 / patch 16 -> img 32 / patch 8: the same 4x4 grid, a kernel a quarter the size."""
    out = tmp_path / "out.safetensors"
    run, report = port_json(vits["patch16"], "--to", vit_spec(32, 8), "-o", out, "--adapt")
    assert run.exit_code == 0, run
    assert [d["ops"] for d in report["derived"]] == [[{"op": "resample_patch_embed", "mode": "bicubic"}]]
    assert "--adapt patch_embed.proj.weight: the patch kernel 16x16 -> 8x8" in report["steps"]
    source, written = torch.load(vits["patch16"], weights_only=True), load_file(out)
    expected = timm.layers.resample_patch_embed(source["patch_embed.proj.weight"], [8, 8])
    torch.testing.assert_close(written["patch_embed.proj.weight"], expected, rtol=0, atol=1e-6)
    assert all(torch.equal(written[k], v) for k, v in source.items() if k != "patch_embed.proj.weight")
    filtered = timm.models.vision_transformer.checkpoint_filter_fn(source, vit(32, 8))
    torch.testing.assert_close(written, filtered, rtol=0, atol=1e-6)


# -- vocabularies ------------------------------------------------------------------------
def gpt2_spec(vocab: int, positions: int = 16) -> str:
    return f"hf:GPT2LMHeadModel?vocab_size={vocab}&n_positions={positions}&n_embd=32&n_layer=2&n_head=2"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GPT-2 with its lm_head tied to wte: torch.save keeps both names on one storage,
    safetensors' save_model keeps one name."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_model

    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    torch.save(model.state_dict(), folder / "gpt2.pth")
    save_model(model, str(folder / "gpt2.safetensors"))
    return {"pth": folder / "gpt2.pth", "safetensors": folder / "gpt2.safetensors"}


def gpt2_model(vocab: int, positions: int = 16) -> torch.nn.Module:
    import transformers

    config = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("saved", ["pth", "safetensors"])
def test_a_vocabulary_grows_with_mean_rows_and_stays_tied(gpt2, tmp_path, saved):
    out = tmp_path / "out.safetensors"
    run, report = port_json(gpt2[saved], "--to", gpt2_spec(110), "-o", out, "--adapt")
    assert run.exit_code == 0, run
    assert report["mismatched"] == [] and report["missing"] == []
    (derived,) = report["derived"]  # the tied pair is adapted once
    assert derived["ops"] == [{"op": "resize_rows", "init": "mean"}]
    tied = {t["target"]: t["loaded_through"] for t in report["tied"]}
    assert tied in (
        {"lm_head.weight": "transformer.wte.weight"},
        {"transformer.wte.weight": "lm_head.weight"},
    )
    old = torch.load(gpt2["pth"], weights_only=True)["transformer.wte.weight"]
    written = load_file(out)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        assert torch.equal(written[name][:100], old)
        mean = old.double().mean(0).to(old.dtype)
        assert all(torch.equal(row, mean) for row in written[name][100:])
    model = gpt2_model(110)
    model.load_state_dict(written)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, written["transformer.wte.weight"])


def test_a_vocabulary_grows_into_a_live_model_and_stays_tied(gpt2):
    model = gpt2_model(110)
    report = surgery.port(gpt2["pth"], into=model, strict=True, adapt=True)
    assert [t for t, _ in report.plan.tied] == ["lm_head.weight"]
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    old = torch.load(gpt2["pth"], weights_only=True)["transformer.wte.weight"]
    assert torch.equal(model.transformer.wte.weight[:100], old)


def test_a_vocabulary_cut_keeps_the_first_rows(gpt2, tmp_path):
    out = tmp_path / "out.pth"
    run, report = port_json(gpt2["pth"], "--to", gpt2_spec(90), "-o", out, "--adapt")
    assert run.exit_code == 0, run
    assert "--adapt transformer.wte.weight: the vocabulary 100 -> 90 rows" in report["steps"]
    old = torch.load(gpt2["pth"], weights_only=True)
    written = torch.load(out, weights_only=True)
    assert torch.equal(written["transformer.wte.weight"], old["transformer.wte.weight"][:90])
    assert torch.equal(written["lm_head.weight"], old["transformer.wte.weight"][:90])
    assert torch.equal(written["transformer.wpe.weight"], old["transformer.wpe.weight"])


@pytest.mark.parametrize("adapt", [(), ("--adapt",)])
def test_a_position_table_is_not_a_vocabulary(gpt2, adapt):
    """`wpe` [n_positions, dim] has rows like a vocabulary: more positions are not resized."""
    run, report = port_json(gpt2["pth"], "--to", gpt2_spec(100, positions=24), "--dry-run", *adapt)
    assert run.exit_code == 1
    assert reasons(report) == {"transformer.wpe.weight": None}
    assert report["derived"] == []


# -- classifiers -------------------------------------------------------------------------
def test_adapt_keeps_the_targets_own_classifier_for_other_classes(seeded_resnet18, tmp_path):
    import torchvision

    out = tmp_path / "out.safetensors"
    torch.manual_seed(7)  # the target is built in this process: its own fc is this seed's
    run, report = port_json(
        seeded_resnet18.plain, "--to", "torchvision:resnet18?num_classes=10", "-o", out, "--adapt"
    )
    assert run.exit_code == 0, run
    assert report["new"] == ["fc.weight", "fc.bias"]
    assert report["unused"] == ["fc.weight", "fc.bias"]
    assert report["mismatched"] == [] and report["derived"] == []
    assert (
        "--adapt fc: the classes 1000 -> 10: the target's own fc kept, as timm does on load"
        in report["steps"]
    )
    torch.manual_seed(7)
    own = torchvision.models.resnet18(num_classes=10).state_dict()
    written = load_file(out)
    assert torch.equal(written["fc.weight"], own["fc.weight"]) and torch.equal(
        written["fc.bias"], own["fc.bias"]
    )
    assert all(
        torch.equal(written[k], v) for k, v in seeded_resnet18.state.items() if not k.startswith("fc.")
    )


def test_other_classes_without_adapt_are_refused_as_before(seeded_resnet18, tmp_path):
    out = tmp_path / "out.safetensors"
    run, report = port_json(seeded_resnet18.plain, "--to", "torchvision:resnet18?num_classes=10", "-o", out)
    assert_clean_error(run, seeded_resnet18.plain, contains="strict port refused", code=1)
    assert reasons(report) == {"fc.weight": None, "fc.bias": None}
    assert not out.exists()


def test_a_rule_selects_ten_of_a_thousand_classifier_rows(seeded_resnet18, tmp_path):
    index = [0, 1, 2, 9, 100, 207, 388, 500, 817, 999]
    rules = tmp_path / "ten.toml"
    rules.write_text(
        f'[[rule]]\nfrom = "fc.{{p}}"\nto = "fc.{{p}}"\nops = [{{ op = "select_rows", index = {index} }}]\n'
    )
    out = tmp_path / "out.safetensors"
    run = run_cli(
        "port",
        seeded_resnet18.plain,
        "--to",
        "torchvision:resnet18?num_classes=10",
        "-o",
        out,
        "--map",
        rules,
    )
    assert run.exit_code == 0, run
    written, state = load_file(out), seeded_resnet18.state
    assert torch.equal(written["fc.weight"], state["fc.weight"][index])
    assert torch.equal(written["fc.bias"], state["fc.bias"][index])


# -- what --adapt leaves alone -----------------------------------------------------------------
NOT_ADAPTED = {  # name: (source shape, target shape)
    "features.0.weight": ((8, 3, 3, 3), (16, 3, 3, 3)),  # a conv with more output channels
    "norm.weight": ((16,), (24,)),  # a LayerNorm of another width
    "blocks.0.attn.rel_bias": ((1, 17, 8), (1, 37, 8)),  # 3-D, grid-like, not a position embedding
    "blocks.0.mlp.fc1.weight": ((64, 16), (32, 16)),  # an MLP layer, not the classifier `fc`
    "blocks.0.mlp.fc1.bias": ((64,), (32,)),
    "head.norm.weight": ((16,), (24,)),  # a norm inside the head
    "head.0.weight": ((64, 16), (32, 16)),  # a head's hidden layer: head.2 reads its outputs
    "head.2.weight": ((10, 64), (10, 32)),
    "stages.0.downsample.proj.weight": ((16, 16, 3, 3), (16, 16, 1, 1)),  # a conv, not a patch embedding
    "bert.embeddings.position_embeddings.weight": ((32, 16), (64, 16)),  # positions, not a vocabulary
    "bert.embeddings.token_type_embeddings.weight": ((2, 16), (1, 16)),
    "encoder.embed_positions.weight": ((32, 16), (64, 16)),
}


@pytest.mark.parametrize("adapt", [(), ("--adapt",)])
def test_other_mismatches_stay_mismatched_with_and_without_adapt(tmp_path, adapt):
    g = torch.Generator().manual_seed(0)
    for side, i in (("source", 0), ("target", 1)):
        save_file(
            {k: torch.randn(shapes[i], generator=g) for k, shapes in NOT_ADAPTED.items()}, tmp_path / side
        )
    run, report = port_json(tmp_path / "source", "--to", tmp_path / "target", "--dry-run", *adapt)
    assert run.exit_code == 1
    assert reasons(report) == dict.fromkeys(NOT_ADAPTED)
    assert report["derived"] == [] and report["new"] == [] and report["hints"] == []
