"""DeepSpeed ZeRO checkpoints: consolidated from the partitions' bytes, nothing unpickled.

Every checkpoint here is written by DeepSpeed itself at test time (`torchrun` over two CPU
ranks, one Adam step, `engine.save_checkpoint`), once per session for ZeRO stages 1, 2 and
3; the reference for what a folder holds is DeepSpeed's own `zero_to_fp32`
(`get_fp32_state_dict_from_zero_checkpoint`), run in a separate process and saved with
`torch.save`, read back here with `weights_only=True`. The planning half (which partition
elements form which tensor) is also checked on its own, without DeepSpeed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli, run_subprocess
from hypothesis import given
from hypothesis import strategies as st

import surgery
from surgery.formats.deepspeed import Run, Source, ZeroLayout, blocks, plan_zero

STAGES = (1, 2, 3)
RUNS = ("zero1", "zero2", "zero3", "zero2-bf16", "zero3-bf16")
CANARY = "CANARY"

# One Adam step of a small model under each ZeRO stage, saved by DeepSpeed. The model has a
# buffer (BatchNorm), a frozen parameter, a tied one (shared_params) and two parameter groups;
# sizes are odd so that parameters straddle the ranks' partitions and padding is needed.
TRAIN = textwrap.dedent(
    """
    import os
    import sys

    import deepspeed
    import torch
    from torch import nn


    RUNS = [("zero1", 1, False), ("zero2", 2, False), ("zero3", 3, False), ("zero2-bf16", 2, True), ("zero3-bf16", 3, True)]


    class Payload:
        # What a hostile client_state holds: torch.load(weights_only=False) would run it.
        def __reduce__(self):
            return (os.system, ("touch CANARY",))


    out = sys.argv[1]
    for name, stage, bf16 in RUNS:
        torch.manual_seed(stage)
        # bf16 on the CPU: BatchNorm cannot run, a LayerNorm and a float buffer (saved in bf16) can
        norm = nn.LayerNorm(7) if bf16 else nn.BatchNorm1d(7)
        model = nn.Sequential(
            nn.Linear(5, 7), norm, nn.ReLU(), nn.Linear(7, 3), nn.Linear(3, 3), nn.Linear(3, 3, bias=False)
        )
        model[0].register_buffer("scale", torch.linspace(0, 1, 6))
        model[4].bias.requires_grad_(False)
        model[5].weight = model[4].weight
        trainable = [p for p in model.parameters() if p.requires_grad]
        config = {
            "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": bf16},
        }
        groups = [{"params": trainable[:3]}, {"params": trainable[3:], "lr": 1e-3}]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
        x = torch.randn(4, 5, dtype=torch.bfloat16 if bf16 else torch.float32)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
        engine.save_checkpoint(f"{out}/{name}")
        if name == "zero2":
            engine.save_checkpoint(f"{out}/payload", client_state={"note": Payload()})
    # every file is written: leave the group, else gloo's threads may abort the process at exit
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    """
)

# DeepSpeed's own consolidation of each folder, saved as a plain state_dict.
REFERENCE = textwrap.dedent(
    """
    import sys

    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for folder in sys.argv[1:]:
        torch.save(get_fp32_state_dict_from_zero_checkpoint(folder), f"{folder}.reference.pt")
    """
)


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        pytest.fail(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


@pytest.fixture(scope="session")
def zero_checkpoints(tmp_path_factory) -> Path:
    """zero1/, zero2/, zero3/, zero2-bf16/, zero3-bf16/ (and payload/) written by DeepSpeed over
    two CPU ranks, each beside DeepSpeed's own consolidation, `NAME.reference.pt`."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("deepspeed")
    (root / "train.py").write_text(TRAIN)
    (root / "reference.py").write_text(REFERENCE)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _run([*torchrun, "train.py", str(root)], root)
    _run([sys.executable, "reference.py", *(str(root / name) for name in RUNS)], root)
    assert not (root / CANARY).exists()
    return root


def reference(root: Path, run: int | str) -> dict[str, torch.Tensor]:
    name = f"zero{run}" if isinstance(run, int) else run
    return torch.load(root / f"{name}.reference.pt", weights_only=True)


def assert_identical(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def copy_of(root: Path, stage: int, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root / f"zero{stage}", tmp_path / f"zero{stage}"))


# == consolidation, against zero_to_fp32 ===============================================


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_convert_is_bit_identical_to_zero_to_fp32(zero_checkpoints, stage, tmp_path):
    out = tmp_path / "model.safetensors"
    run = run_cli("convert", zero_checkpoints / f"zero{stage}", "-o", out)
    assert run.exit_code == 0, run.stderr
    assert_identical(surgery.open_checkpoint(out).state_dict(), reference(zero_checkpoints, stage))


@pytest.mark.slow
@pytest.mark.parametrize("run", ["zero2-bf16", "zero3-bf16"])
def test_bf16_training_consolidates_as_zero_to_fp32_does(zero_checkpoints, run, tmp_path):
    """bf16 training: optimizer files named bf16_*, buffers saved in bf16 (made float32, as
    zero_to_fp32 does), frozen parameters kept in bf16."""
    assert list((zero_checkpoints / run / "global_step1").glob("bf16_zero_pp_rank_*_optim_states.pt"))
    out = tmp_path / "model.safetensors"
    assert run_cli("convert", zero_checkpoints / run, "-o", out).exit_code == 0
    expected = reference(zero_checkpoints, run)
    assert expected["0.scale"].dtype == torch.float32 and expected["4.bias"].dtype == torch.bfloat16
    assert_identical(surgery.open_checkpoint(out).state_dict(), expected)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_the_library_reads_the_same_tensors_from_the_tag_folder(zero_checkpoints, stage):
    ckpt = surgery.open_checkpoint(zero_checkpoints / f"zero{stage}" / "global_step1")
    assert ckpt.format == "deepspeed"
    assert_identical(ckpt.state_dict(), reference(zero_checkpoints, stage))


@pytest.mark.slow
def test_a_tied_parameter_is_the_very_same_tensor(zero_checkpoints):
    ckpt = surgery.open_checkpoint(zero_checkpoints / "zero3")
    assert ckpt.aliases == {"5.weight": "4.weight"}
    assert ckpt.metadata["deepspeed"]["shared"] == {"5.weight": "4.weight"}


@pytest.mark.slow
def test_sharded_output_with_a_cast_equals_zero_to_fp32_cast(zero_checkpoints, tmp_path):
    out = tmp_path / "shards"
    run = run_cli("convert", zero_checkpoints / "zero3", "-o", out, "--shard-size", "200B", "--dtype", "bf16")
    assert run.exit_code == 0, run.stderr
    assert len(list(out.glob("*.safetensors"))) > 1
    expected = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in reference(zero_checkpoints, 3).items()
    }
    assert_identical(surgery.open_checkpoint(out).state_dict(), expected)


@pytest.mark.slow
def test_diff_finds_no_difference_from_zero_to_fp32(zero_checkpoints):
    run = run_cli("diff", zero_checkpoints / "zero2", zero_checkpoints / "zero2.reference.pt", "--exit-code")
    assert run.exit_code == 0, run.stdout + run.stderr


@pytest.mark.slow
def test_port_and_merge_take_the_folder_as_any_checkpoint(zero_checkpoints, tmp_path):
    expected = reference(zero_checkpoints, 3)
    template = zero_checkpoints / "zero3.reference.pt"
    ported, merged = tmp_path / "ported.safetensors", tmp_path / "merged.safetensors"
    run = run_cli("port", zero_checkpoints / "zero3", "--to", template, "-o", ported)
    assert run.exit_code == 0, run.stderr
    assert_identical(surgery.open_checkpoint(ported).state_dict(), expected)
    run = run_cli(
        "merge", zero_checkpoints / "zero3", zero_checkpoints / "zero3" / "global_step1", "-o", merged
    )
    assert run.exit_code == 0, run.stderr  # the mean of one checkpoint twice is itself
    assert_identical(surgery.open_checkpoint(merged).state_dict(), expected)


@pytest.mark.slow
def test_frozen_parameters_zero_1_does_not_record_are_named(zero_checkpoints):
    """DeepSpeed saves no frozen_param_shapes at ZeRO-1: zero_to_fp32 drops the frozen
    parameter, and so does the output, but inspect says so."""
    ckpt = surgery.open_checkpoint(zero_checkpoints / "zero1")
    assert "4.bias" not in ckpt.tensors_by_name and "4.bias" not in reference(zero_checkpoints, 1)
    assert any("4.bias" in f.message and f.severity == "notice" for f in ckpt.findings)


# == inspect ============================================================================


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_inspect_says_stage_ranks_and_optimizer(zero_checkpoints, stage):
    run = run_cli("inspect", zero_checkpoints / f"zero{stage}")
    assert run.exit_code == 0, run.stderr
    assert f"DeepSpeed ZeRO-{stage} checkpoint global_step1: 2 data-parallel ranks" in run.stdout
    assert "(Adam)" in run.stdout and "[7, 5]  float32" in run.stdout
    assert "LossScaler" in run.stdout  # a notice: DeepSpeed's classes read as records


@pytest.mark.slow
def test_inspect_json_lists_partitions_and_shapes(zero_checkpoints):
    doc = json.loads(run_cli("inspect", zero_checkpoints / "zero3", "--json").stdout)
    info = doc["metadata"]["deepspeed"]
    assert doc["format"] == "deepspeed" and doc["safe"] is True
    assert info["zero_stage"] == 3 and info["dp_world_size"] == 2
    assert info["optim_files"] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    assert info["model_files"] == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]
    assert (info["trainable"], info["frozen"], info["buffers"]) == (7, 1, 4)
    shapes = {t["name"]: t["shape"] for t in doc["tensors"]}
    assert shapes["0.weight"] == [7, 5] and shapes["1.num_batches_tracked"] == []
    # each rank holds ceil(numel / 2) of every trainable parameter, in two groups
    halves = [math.ceil(n / 2) for n in (35, 7, 7, 7, 21, 3, 9)]
    assert [sum(groups) for groups in info["fp32_partitions"]] == [sum(halves)] * 2


@pytest.mark.slow
def test_inspect_does_not_import_torch(zero_checkpoints):
    code = (
        "import sys, surgery; c = surgery.open_checkpoint(sys.argv[1]); "
        "print(c.num_tensors, 'torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(zero_checkpoints / "zero2")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.split() == ["13", "False"]


# == bad input ===========================================================================


@pytest.mark.slow
def test_a_truncated_partition_is_a_clean_error_and_nothing_is_written(zero_checkpoints, tmp_path):
    folder = copy_of(zero_checkpoints, 2, tmp_path)
    partition = folder / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    partition.write_bytes(partition.read_bytes()[:-300])
    out = tmp_path / "out.safetensors"
    run = run_subprocess("convert", folder, "-o", out)
    assert_clean_error(run, partition, contains="zip")
    assert not out.exists() and list(tmp_path.glob("out*")) == []


@pytest.mark.slow
def test_a_missing_partition_is_named(zero_checkpoints, tmp_path):
    folder = copy_of(zero_checkpoints, 3, tmp_path)
    (folder / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    out = tmp_path / "out.safetensors"
    run = run_cli("convert", folder, "-o", out)
    assert_clean_error(run, folder / "global_step1", contains="a partition is missing")
    assert not out.exists()


def test_a_model_parallel_checkpoint_is_refused_by_name(zero_checkpoints, tmp_path):
    """A second model-parallel rank's files (mp_rank_01): not merged, said as such."""
    folder = copy_of(zero_checkpoints, 2, tmp_path)
    tag = folder / "global_step1"
    shutil.copy(tag / "mp_rank_00_model_states.pt", tag / "mp_rank_01_model_states.pt")
    out = tmp_path / "out.safetensors"
    run = run_cli("convert", folder, "-o", out)
    assert_clean_error(
        run, tag, contains="tensor- or pipeline-parallel checkpoint (mp_rank_01_model_states.pt)"
    )
    assert not out.exists()


@pytest.mark.slow
def test_a_folder_without_optimizer_partitions_points_at_the_model_states(zero_checkpoints, tmp_path):
    folder = copy_of(zero_checkpoints, 2, tmp_path)
    for partition in (folder / "global_step1").glob("*_optim_states.pt"):
        partition.unlink()
    error = assert_clean_error(run_cli("inspect", folder), folder / "global_step1", contains="fp32 weights")
    assert "optim_states" in error


@pytest.mark.slow
def test_latest_naming_a_missing_tag_is_a_clean_error(zero_checkpoints, tmp_path):
    folder = copy_of(zero_checkpoints, 1, tmp_path)
    (folder / "latest").write_text("global_step9")
    assert_clean_error(
        run_cli("convert", folder, "-o", tmp_path / "o.safetensors"), folder / "latest", code=1
    )
    (folder / "latest").write_text("../../elsewhere")
    assert_clean_error(run_cli("inspect", folder), folder / "latest", contains="not a folder name")


@pytest.mark.slow
def test_links_leading_out_of_the_folder_are_refused(zero_checkpoints, tmp_path):
    folder = copy_of(zero_checkpoints, 2, tmp_path)
    (tmp_path / "elsewhere").symlink_to(zero_checkpoints / "zero3" / "global_step1")
    (folder / "global_step9").symlink_to(tmp_path / "elsewhere")
    (folder / "latest").write_text("global_step9")
    assert_clean_error(run_cli("inspect", folder), folder / "latest", contains="a link leading outside")
    tag = folder / "global_step1"
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    (tag / name).unlink()
    (tag / name).symlink_to(zero_checkpoints / "zero2" / "global_step1" / name)
    assert_clean_error(run_cli("inspect", tag), tag, contains="outside the folder (through a link)")


@pytest.mark.slow
def test_a_partition_of_another_checkpoint_is_refused(zero_checkpoints, tmp_path):
    """Rank 1's file replaced by the ZeRO-1 run's: the files disagree, which is said."""
    folder = copy_of(zero_checkpoints, 2, tmp_path) / "global_step1"
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(zero_checkpoints / "zero1" / "global_step1" / name, folder / name)
    out = tmp_path / "o.safetensors"
    assert_clean_error(run_cli("convert", folder, "-o", out), folder / name, contains="ZeRO stage 1")
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "file, content, says",
    [
        (
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            {"optimizer_state_dict": {"zero_stage": [2]}},
            "stage [2]",
        ),
        (
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            {"state": {}},
            "not a DeepSpeed ZeRO optimizer partition",
        ),
        (
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            {
                "optimizer_state_dict": {
                    "zero_stage": 2,
                    "single_partition_of_fp32_groups": [torch.ones(2, 2)],
                }
            },
            "not a list of flat tensors",
        ),
        ("mp_rank_00_model_states.pt", {"module": {}}, "no 'buffer_names'"),
        ("mp_rank_00_model_states.pt", {"module": {}, "param_shapes": [], "buffer_names": ["x"]}, "'x'"),
        (
            "mp_rank_00_model_states.pt",
            {"module": {}, "param_shapes": [{"w": "big"}], "buffer_names": []},
            "'w'",
        ),
    ],
)
def test_files_that_are_not_what_deepspeed_writes_are_refused(
    zero_checkpoints, tmp_path, file, content, says
):
    folder = copy_of(zero_checkpoints, 2, tmp_path) / "global_step1"
    torch.save(content, folder / file)
    out = tmp_path / "o.safetensors"
    assert_clean_error(run_cli("convert", folder, "-o", out), folder / file, contains=says, code=1)
    assert not out.exists()


# == nothing runs ========================================================================


@pytest.mark.slow
def test_a_payload_in_the_client_state_is_a_danger_and_never_runs(zero_checkpoints, tmp_path):
    folder = zero_checkpoints / "payload"
    run = run_subprocess("inspect", folder, cwd=tmp_path)
    assert run.exit_code == 1 and "danger: global posix.system" in run.stdout, run.stdout
    out = tmp_path / "out.safetensors"
    assert_clean_error(run_subprocess("convert", folder, "-o", out, cwd=tmp_path), folder / "global_step1")
    assert not out.exists()
    # trusted, the tensors are read from their bytes: still nothing runs
    assert run_subprocess("convert", folder, "-o", out, "--trust", cwd=tmp_path).exit_code == 0
    assert_identical(surgery.open_checkpoint(out).state_dict(), reference(zero_checkpoints, 2))
    assert not (tmp_path / CANARY).exists() and not (zero_checkpoints / CANARY).exists()


# == planning, without DeepSpeed =========================================================


def layout(stage: int, shapes: list[dict], numels: list[list[int]], **more) -> ZeroLayout:
    fields = dict(
        stage=stage,
        world_size=len(numels),
        param_shapes=tuple(shapes),
        partition_numels=tuple(tuple(n) for n in numels),
        alignment_paddings=None,
        module_names=(),
        buffer_names=frozenset(),
        frozen_shapes={},
        fragment_numels=({},),
        shared={},
    )
    return ZeroLayout(**(fields | more))


def runs_of(plan, name: str) -> list[tuple[int, int, int, int]]:
    placement = dict(plan.entries)[name]
    return [(r.source.rank, int(r.source.key), r.start, r.length) for r in placement.runs]


def test_a_zero2_parameter_straddling_two_ranks_takes_the_end_of_one_and_the_start_of_the_next():
    plan = plan_zero(layout(2, [{"a": (3,), "b": (2, 3)}], [[6], [3]]))
    assert runs_of(plan, "a") == [(0, 0, 0, 3)]
    assert runs_of(plan, "b") == [(0, 0, 3, 3), (1, 0, 0, 3)]


def test_zero2_alignment_paddings_are_skipped():
    plan = plan_zero(layout(2, [{"a": (3,), "b": (2,)}], [[4], [2]], alignment_paddings=((1, 0),)))
    assert runs_of(plan, "b") == [(1, 0, 0, 2)]


def test_a_zero3_parameter_is_a_ceil_share_of_every_rank_cut_to_its_size():
    plan = plan_zero(layout(3, [{"a": (5,)}, {"b": (2,)}], [[3, 1], [3, 1]]))
    assert runs_of(plan, "a") == [(0, 0, 0, 3), (1, 0, 0, 2)]
    assert runs_of(plan, "b") == [(0, 1, 0, 1), (1, 1, 0, 1)]


def test_a_zero3_frozen_parameter_joins_the_ranks_fragments():
    plan = plan_zero(
        layout(3, [], [[0], [0]], frozen_shapes={"f": (3,)}, fragment_numels=({"f": 2}, {"f": 2}))
    )
    assert [(r.source, r.length) for r in dict(plan.entries)["f"].runs] == [
        (Source("fragment", 0, "f"), 2),
        (Source("fragment", 1, "f"), 1),
    ]


def test_order_is_buffers_then_frozen_then_trainable_then_shared_names():
    plan = plan_zero(
        layout(
            2,
            [{"w": (2,)}],
            [[1], [1]],
            module_names=("w", "rm", "f", "tied"),
            buffer_names=frozenset({"rm"}),
            frozen_shapes={"f": (1,)},
            fragment_numels=({"f": 1},),
            shared={"tied": "w"},
        )
    )
    assert [name for name, _ in plan.entries] == ["rm", "f", "w", "tied"]
    assert plan.aliases == {"tied": "w"}


@pytest.mark.parametrize(
    "bad, says",
    [
        (layout(2, [{"a": (9,)}], [[2], [2]]), "reaches element 9"),
        (layout(2, [{"a": (2,)}], [[4], [4]]), "param_shapes take 2 elements, its partitions hold 8"),
        (layout(3, [{"a": (4,)}], [[2], [3]]), "differ in size"),
        (layout(3, [{"a": (2,)}], [[3], [3]]), "take 1 elements"),
        (layout(2, [], [[0]], frozen_shapes={"f": (1,)}), "not in frozen_param_fragments"),
        (layout(1, [{"a": (1,)}, {"b": (1,)}], [[2], [2]]), "2 parameter groups, the partitions 1"),
    ],
)
def test_partitions_and_shapes_that_disagree_are_refused(bad, says):
    with pytest.raises(ValueError, match=says):
        plan_zero(bad)


@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple),
    data=st.data(),
)
def test_blocks_cover_a_flat_range_with_contiguous_views(shape, data):
    numel = math.prod(shape)
    start = data.draw(st.integers(0, numel))
    length = data.draw(st.integers(0, numel - start))
    whole = torch.arange(numel).reshape(shape)
    covered = []
    for flat_start, offsets, sizes in blocks(shape, start, length):
        block = whole[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))]
        assert block.shape == sizes
        assert block.flatten().tolist() == list(range(flat_start, flat_start + block.numel()))
        covered += block.flatten().tolist()
    assert covered == list(range(start, start + length))


def test_runs_are_plain_data():
    assert Run(Source("partition", 1, 0), 3, 4) == Run(Source("partition", 1, 0), 3, 4)
