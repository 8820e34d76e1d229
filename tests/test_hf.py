"""Hugging Face model folders: sources everywhere, `hf:` targets, `--format hf` outputs.

Folders are written by transformers' own `save_pretrained` (tiny BERTs, seeded, never
downloaded) or, for the tests that need no transformers, by `safetensors` and `json`
in the same layout. Outputs are loaded back by `from_pretrained` and run on a fixed
input against a reference model. Nothing here touches the network: HF_HUB_OFFLINE is set
before transformers is imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli
from safetensors import safe_open
from safetensors.torch import save_file

import surgery
from surgery.errors import UsageError
from surgery.models.targets import build_target
from surgery.trust import Untrusted, imports_code, library_of

os.environ["HF_HUB_OFFLINE"] = "1"  # before any test imports transformers

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "vocab_size": 99,
}
INPUT = [[2, 15, 7, 42, 3, 0]]
CANARY = "CANARY_REMOTE_CODE_RAN"


# -- folders without transformers ---------------------------------------------------------
def bert_like_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embeddings.word_embeddings.weight": torch.randn(99, 32, generator=g),
        "pooler.dense.weight": torch.randn(32, 32, generator=g),
        "pooler.dense.bias": torch.randn(32, generator=g),
    }


def write_folder(folder: Path, config: dict | None = None, *, weights: str = "model.safetensors") -> Path:
    """A folder in save_pretrained's layout: config.json beside the weights."""
    folder.mkdir()
    config = {"architectures": ["BertModel"], "model_type": "bert", **TINY} if config is None else config
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if weights.endswith(".safetensors"):
        save_file(bert_like_weights(), str(folder / weights), metadata={"format": "pt"})
    else:
        torch.save(bert_like_weights(), folder / weights)
    return folder


def inspect_json(path: Path) -> dict:
    run = run_cli("inspect", path, "--json")
    assert run.exit_code == 0, run
    return json.loads(run.stdout)


def test_a_hugging_face_folder_opens_as_one_checkpoint(tmp_path):
    folder = write_folder(tmp_path / "bert")
    run = run_cli("inspect", folder)
    assert run.exit_code == 0, run
    assert "Hugging Face model folder: safetensors" in run.stdout
    assert "hf model    BertModel (model_type bert)" in run.stdout
    ckpt = surgery.open_checkpoint(folder)
    assert sorted(t.name for t in ckpt.tensors) == sorted(bert_like_weights())
    assert ckpt.files == [folder / "config.json", folder / "model.safetensors"]
    assert ckpt.metadata["hf_config"] == {"architectures": ["BertModel"], "model_type": "bert"}
    assert torch.equal(ckpt.tensor("pooler.dense.bias"), bert_like_weights()["pooler.dense.bias"])


def test_a_folder_of_pytorch_model_bin_is_read_without_running_it(tmp_path):
    folder = write_folder(tmp_path / "bert", weights="pytorch_model.bin")
    ckpt = surgery.open_checkpoint(folder)
    assert ckpt.format == "torch-zip" and ckpt.safe
    assert torch.equal(ckpt.tensor("pooler.dense.weight"), bert_like_weights()["pooler.dense.weight"])


def test_safetensors_weights_are_preferred_as_from_pretrained_prefers_them(tmp_path):
    folder = write_folder(tmp_path / "bert")
    torch.save({"other": torch.zeros(1)}, folder / "pytorch_model.bin")
    ckpt = surgery.open_checkpoint(folder)
    assert ckpt.format == "safetensors" and "other" not in ckpt.tensors_by_name
    assert any("also holds pytorch_model.bin" in f.message for f in ckpt.findings)


def test_a_config_naming_remote_code_is_reported_and_never_imported(tmp_path):
    config = {"architectures": ["EvilModel"], "auto_map": {"AutoModel": "modeling_evil.EvilModel"}}
    folder = write_folder(tmp_path / "evil", config)
    (folder / "modeling_evil.py").write_text(f"open({CANARY!r}, 'w').close()\n")
    run = run_cli("inspect", folder)
    assert run.exit_code == 0, run
    assert "modeling_evil.EvilModel" in run.stdout and "never imports it" in run.stdout
    assert not Path(CANARY).exists() and not (folder / CANARY).exists()


def test_a_broken_config_still_leaves_the_weights_readable(tmp_path):
    folder = write_folder(tmp_path / "bert")
    (folder / "config.json").write_text("{not json")
    ckpt = surgery.open_checkpoint(folder)
    assert ckpt.num_tensors == 3
    assert any("config.json" in f.message and "not a JSON" in f.message for f in ckpt.findings)
    assert ckpt.files == [folder / "model.safetensors"]


def test_convert_and_diff_read_a_folder(tmp_path):
    folder = write_folder(tmp_path / "bert")
    out = tmp_path / "flat.pt"
    run = run_cli("convert", folder, "-o", out, "--verify")
    assert run.exit_code == 0, run
    loaded = torch.load(out, weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in bert_like_weights().items())
    diff = run_cli("diff", folder, out)
    assert diff.exit_code == 0 and "identical  3 of 3" in diff.stdout, diff


# -- hf: targets: the rules, and refusals before transformers is needed ---------------------
@pytest.mark.parametrize("spec", ["hf:BertModel", "hf:path/to/folder", "hf:BertModel?num_labels=3&config=x"])
def test_hf_targets_are_library_targets(spec):
    """A file may name an hf: target without trust: it only picks a transformers class."""
    assert library_of(spec) == "hf"
    assert not imports_code(spec)


@pytest.mark.parametrize(
    "query, keyword",
    [
        ("trust_remote_code=True", "trust_remote_code"),
        ("pretrained=True", "pretrained"),
        ("pretrained_model_name_or_path='bert-base-uncased'", "pretrained_model_name_or_path"),
        ("revision='main'", "revision"),
        ("auto_map={'AutoModel': 'evil.Model'}", "auto_map"),
    ],
)
def test_loading_keywords_are_refused(query, keyword):
    with pytest.raises(UsageError) as caught:
        build_target(f"hf:BertModel?{query}")
    assert f"`{keyword}`" in caught.value.message


def test_an_attention_kernel_from_the_hub_is_refused():
    with pytest.raises(UsageError) as caught:
        build_target("hf:BertModel?attn_implementation='kernels-community/flash-attn'")
    assert "kernels" in caught.value.message


def test_a_folder_whose_config_names_remote_code_is_refused_without_trust(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {
        "architectures": ["EvilModel"],
        "model_type": "bert",
        "auto_map": {"AutoModel": "modeling_evil.EvilModel"},
    }
    folder = write_folder(tmp_path / "evil", config)
    (folder / "modeling_evil.py").write_text(f"open({CANARY!r}, 'w').close()\n")
    src = write_folder(tmp_path / "src")
    run = run_cli("port", src, "--to", f"hf:{folder}", "--dry-run")
    assert_clean_error(run, folder / "config.json", contains="auto_map names a repository's own code", code=1)
    assert "--trust" in run.stderr
    assert not (tmp_path / CANARY).exists()


def test_an_empty_or_missing_hf_target_is_a_clean_error(tmp_path):
    src = write_folder(tmp_path / "src")
    assert_clean_error(
        run_cli("port", src, "--to", "hf:", "--dry-run"), "hf:", contains="name a transformers"
    )
    missing = tmp_path / "nope"
    run = run_cli("port", src, "--to", f"hf:{missing}", "--dry-run")
    assert_clean_error(run, missing, contains="no such file")


# -- --format hf: refusals and a template folder, without transformers -------------------------
def test_format_hf_needs_a_config(tmp_path):
    src = write_folder(tmp_path / "src")
    template = tmp_path / "template.safetensors"
    save_file(bert_like_weights(), str(template))
    out = tmp_path / "out"
    run = run_cli("port", src, "--to", template, "-o", out, "--format", "hf")
    assert_clean_error(run, template, contains="--format hf needs a config.json")
    assert not out.exists()


def test_shard_size_needs_format_hf(tmp_path):
    src = write_folder(tmp_path / "src")
    run = run_cli("port", src, "--to", src, "-o", tmp_path / "out.safetensors", "--shard-size", "1KB")
    assert run.exit_code == 2 and "--format hf" in run.stderr, run


def test_format_hf_refuses_edits_its_config_would_not_describe(tmp_path):
    src = write_folder(tmp_path / "src")
    run = run_cli("port", src, "--to", src, "-o", tmp_path / "out", "--format", "hf", "--num-classes", "3")
    assert run.exit_code == 2 and "config's keywords" in run.stderr, run
    assert not (tmp_path / "out").exists()


def test_format_hf_refuses_a_folder_in_use(tmp_path):
    src = write_folder(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    run = run_cli("port", src, "--to", src, "-o", out, "--format", "hf", "--force")
    assert_clean_error(run, out, contains="also holds notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


def test_a_template_folder_gives_its_config_to_the_output(tmp_path):
    """Port into a Hugging Face folder used as the template: the output folder gets its
    config.json as it is, and safetensors weights with `format: pt` and the provenance."""
    src = write_folder(tmp_path / "src")
    template = write_folder(tmp_path / "template")
    out = tmp_path / "out"
    run = run_cli("port", src, "--to", template, "-o", out, "--format", "hf", "--verify")
    assert run.exit_code == 0, run
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "config.json").read_bytes() == (template / "config.json").read_bytes()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "pt" and meta["surgery.target"] == str(template)
        assert all(torch.equal(f.get_tensor(k), v) for k, v in bert_like_weights().items())


def test_format_hf_shards_past_the_shard_size(tmp_path):
    src = write_folder(tmp_path / "src")
    out = tmp_path / "out"
    run = run_cli("port", src, "--to", src, "-o", out, "--format", "hf", "--shard-size", "8KB", "--verify")
    assert run.exit_code == 0, run
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in bert_like_weights().values())
    assert not (out / "model.safetensors").exists()
    reread = surgery.open_checkpoint(out)
    assert sorted(t.name for t in reread.tensors) == sorted(bert_like_weights())


def test_convert_writes_a_folder_with_the_source_folders_config(tmp_path):
    src = write_folder(tmp_path / "src")
    out = tmp_path / "out"
    run = run_cli("convert", src, "-o", out, "--format", "hf", "--shard-size", "8KB", "--verify")
    assert run.exit_code == 0, run
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (out / "model.safetensors.index.json").exists()
    with safe_open(str(out / "model-00001-of-00002.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_convert_refuses_format_hf_without_a_config_before_writing(tmp_path):
    src = tmp_path / "plain.safetensors"
    save_file(bert_like_weights(), str(src))
    out = tmp_path / "out"
    assert_clean_error(
        run_cli("convert", src, "-o", out, "--format", "hf"), src, contains="needs a config.json"
    )
    assert not out.exists()


# == with transformers =====================================================================
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """Tiny BERTs saved by transformers: `cls.pt` (BertForSequenceClassification's
    state_dict, `bert.`-prefixed, saved as a plain torch file), `bare/` (BertModel) and
    `mlm/` (BertForMaskedLM, its decoder tied to the embeddings), and the models themselves."""
    import transformers

    root = tmp_path_factory.mktemp("bert")
    config = transformers.BertConfig(**TINY, num_labels=3)
    torch.manual_seed(0)
    classifier = transformers.BertForSequenceClassification(config).eval()
    torch.save(classifier.state_dict(), root / "cls.pt")
    torch.manual_seed(1)
    bare = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    bare.save_pretrained(root / "bare")
    torch.manual_seed(2)
    mlm = transformers.BertForMaskedLM(transformers.BertConfig(**TINY)).eval()
    mlm.save_pretrained(root / "mlm")
    return root, {"classifier": classifier, "bare": bare, "mlm": mlm}


def assert_same_model(model, reference, output: str) -> None:
    """Bit-identical weights, and the same `output` on a fixed input. Equal to float
    rounding only: a tensor read from a file lies at another memory alignment, and the
    matrix kernels sum in another order there (measured: 2.6e-08 on the pooler)."""
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    with torch.no_grad():
        a = getattr(model.eval()(torch.tensor(INPUT)), output)
        b = getattr(reference.eval()(torch.tensor(INPUT)), output)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_bert_prefixed_checkpoint_ports_into_a_bare_bert_model(bert, tmp_path):
    """BertForSequenceClassification's weights (`bert.` keys, a head) -> hf:BertModel: the
    output folder loads with from_pretrained and computes what the classifier's encoder does."""
    import transformers

    root, models = bert
    out = tmp_path / "bare-out"
    run = run_cli(
        "port", root / "cls.pt", "--to", f"hf:{root / 'bare'}", "--strip-prefix", "bert.",
        "--exclude", "classifier.*", "-o", out, "--format", "hf", "--verify",
    )  # fmt: skip
    assert run.exit_code == 0, run
    assert "loaded 39/39 tensors" in run.stdout and "41 tensors" not in run.stdout
    model, info = transformers.BertModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    assert_same_model(model, models["classifier"].bert, "last_hidden_state")


@pytest.mark.slow
def test_bare_bert_weights_port_into_a_sequence_classifier(bert, tmp_path):
    """BertModel's bare keys -> hf:BertForSequenceClassification?num_labels=3&config=...:
    `--add-prefix bert.`, the new head reported missing, and the output folder's logits
    equal to a reference built the same way (same seed for the head, the encoder loaded)."""
    import transformers

    root, models = bert
    out = tmp_path / "cls-out"
    spec = f"hf:BertForSequenceClassification?num_labels=3&config={root / 'bare'}"
    torch.manual_seed(7)
    run = run_cli("port", root / "bare", "--to", spec, "--add-prefix", "bert.", "--strict", "false",
                  "-o", out, "--format", "hf")  # fmt: skip
    assert run.exit_code == 0, run
    assert "missing 2: classifier.{bias,weight}" in run.stdout
    config = transformers.BertConfig.from_dict({**TINY, "num_labels": 3})
    torch.manual_seed(7)
    reference = transformers.BertForSequenceClassification(config).eval()
    reference.bert.load_state_dict(models["bare"].state_dict())
    model, info = transformers.BertForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_labels == 3
    assert_same_model(model, reference, "logits")
    assert_same_model(model.bert, models["bare"], "last_hidden_state")


@pytest.mark.slow
def test_tied_weights_port_strictly_and_are_stored_once(bert, tmp_path):
    """save_pretrained stores BERT's tied decoder once: a strict port into hf:FOLDER counts
    it as loaded through the tie, and the sharded output stores it once again."""
    import transformers

    root, models = bert
    out = tmp_path / "mlm-out"
    run = run_cli("port", root / "mlm", "--to", f"hf:{root / 'mlm'}", "-o", out, "--format", "hf",
                  "--shard-size", "40KB", "--verify")  # fmt: skip
    assert run.exit_code == 0, run
    assert (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "cls.predictions.decoder.weight" not in index["weight_map"]
    model, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        assert torch.equal(
            model.eval()(torch.tensor(INPUT)).logits, models["mlm"](torch.tensor(INPUT)).logits
        )
    reread = surgery.open_checkpoint(out)
    assert reread.restored["cls.predictions.decoder.weight"] == "bert.embeddings.word_embeddings.weight"


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, says",
    [
        ("hf:BertConfig", "'BertConfig' is not a transformers model class"),
        ("hf:BertModl", "did you mean"),
        ("hf:PreTrainedModel", "base class"),
        ("hf:GPT2Model?config={bare}", "a 'bert' config; GPT2Model takes a 'gpt2' config"),
    ],
)
def test_only_transformers_model_classes_are_built(bert, spec, says):
    root, _ = bert
    spec = spec.format(bare=root / "bare")
    with pytest.raises(UsageError) as caught:
        build_target(spec)
    assert says in caught.value.message + (caught.value.hint or "")


@pytest.mark.slow
def test_trust_builds_transformers_own_class_and_still_imports_no_remote_code(bert, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root, _ = bert
    folder = tmp_path / "remote"
    folder.mkdir()
    config = json.loads((root / "bare" / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(f"open({CANARY!r}, 'w').close()\n")
    with pytest.raises(Untrusted):
        build_target(f"hf:{folder}")
    target = build_target(f"hf:{folder}", trust=True)
    assert type(target.module).__name__ == "BertModel"
    assert type(target.module).__module__.startswith("transformers.")
    assert not hasattr(target.module.config, "auto_map") or not target.module.config.auto_map
    assert not (tmp_path / CANARY).exists() and not (folder / CANARY).exists()


@pytest.mark.slow
def test_a_converted_folder_loads_with_from_pretrained(bert, tmp_path):
    import transformers

    root, models = bert
    out = tmp_path / "mlm-converted"
    run = run_cli("convert", root / "mlm", "-o", out, "--format", "hf", "--verify")
    assert run.exit_code == 0, run
    model, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_model(model, models["mlm"], "logits")
