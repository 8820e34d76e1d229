"""The documentation as the tests read it: README.md and the docs/ pages in the site's order,
the fenced blocks in them, and the files their examples are run on."""

from __future__ import annotations

import argparse
import enum
import importlib.util
import pathlib
import re
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
HOME = "index.md"  # the site's home page: README.md itself (docs/readme_as_home.py)

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def nav() -> list[str]:
    """The pages of mkdocs.yml's nav in order, as paths under docs/."""
    import yaml

    def flatten(items) -> list[str]:
        pages = []
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            pages += flatten(value) if isinstance(value, list) else [value]
        return pages

    return flatten(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])


def pages() -> list[Path]:
    """README.md, then every docs/*.md page: in the nav's order, any page missing from it last."""
    on_disk = sorted(DOCS.glob("*.md"))
    order = {name: i for i, name in enumerate(nav())}
    return [README] + sorted(on_disk, key=lambda p: (order.get(p.name, len(order)), p.name))


PAGES = pages()


def fenced(page: Path) -> list[tuple[str, str]]:
    """(language, text) of each fenced block of a page, in order."""
    return FENCE.findall(page.read_text(encoding="utf-8"))


def blocks(language: str) -> list[str]:
    """The distinct blocks of one language over every page, in reading order: a README
    example that a page repeats is one example."""
    found = [text for page in PAGES for lang, text in fenced(page) if lang == language]
    return list(dict.fromkeys(found))


CONSOLE = blocks("console")
PYTHON = blocks("python")


# -- the files the examples name ----------------------------------------------------------------


def make_fixtures():
    """fixtures/make_fixtures.py as a module (tiny_net, seeded)."""
    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "fixtures" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def imagenet_checkpoint(folder: Path) -> Path:
    """`checkpoint.pth.tar`: the PyTorch ImageNet example's checkpoint of a seeded resnet18."""
    import torch
    import torchvision

    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None)
    state = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": state}, folder / "checkpoint.pth.tar")
    return folder / "checkpoint.pth.tar"


def unsafe_training_checkpoint(folder: pathlib.Path) -> pathlib.Path:
    """`checkpoint.pth`: the fixtures' seeded tiny_net beside objects of the training script
    (module `train`), a numpy scalar and an argparse.Namespace, which weights_only refuses."""
    import numpy as np
    import torch

    train = types.ModuleType("train")

    class Mode(enum.Enum):
        TRAIN = "train"

    class Config:
        def __init__(self):
            self.data = pathlib.PosixPath("/data/imagenet")
            self.mode = Mode.TRAIN
            self.warmup = 5

    for cls in (Mode, Config):
        cls.__module__, cls.__qualname__ = "train", cls.__name__
        setattr(train, cls.__name__, cls)
    sys.modules["train"] = train
    try:
        checkpoint = {
            "epoch": 90,
            "state_dict": make_fixtures().seeded(0).state_dict(),
            "best_acc1": np.float64(76.13),
            "args": argparse.Namespace(arch="tiny_net", lr=0.1, epochs=90),
            "config": Config(),
        }
        torch.save(checkpoint, folder / "checkpoint.pth")
    finally:
        del sys.modules["train"]
    return folder / "checkpoint.pth"


def download_mistakes(folder: Path) -> None:
    """`model.bin`, a Git LFS pointer where the weights should be, and `weights/`, a folder
    holding one safetensors file: the bad inputs the inspect page shows."""
    (folder / "model.bin").write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 46830571\n"
    )
    (folder / "weights").mkdir()
    (folder / "weights" / "model.safetensors").write_bytes(
        (ROOT / "fixtures" / "tiny.safetensors").read_bytes()
    )
