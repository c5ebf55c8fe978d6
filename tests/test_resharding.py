"""A resume with another number of ranks: the checkpoint is converted to DeepSpeed's universal format and
re-sharded (meft_ds.training.checkpoint.prepare_resharding).

2 -> 1 and 1 -> 2 ranks, ZeRO-2 and ZeRO-3 (every weight partitioned) fp32, dropout 0, a tiny random BERT,
global batch 8 throughout (2 ranks x
micro-batch 4, or 1 rank x micro-batch 4 x accumulation 2: the same micro-batches, see trainer.global_batches).
(ZeRO-1 and bf16 convert and resume the same way: measured once, docs/training.md.)
Each 4-step run is saved at step 2 and resumed at the other world size; steps 3 and 4 of the resumed run must
equal the uninterrupted run at the original world size. Step 3's loss checks the re-sharded weights, step 4's
the Adam moments and the schedule too (without the moments its update would be about lr * sign(g)).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from meft_ds.training.checkpoint import missing_shard_files
from train_helpers import BIN, REPO, free_port, run, save_tiny_bert, train_losses, write_preset, write_tiny_sst2

WORKER = REPO / "tests" / "train_zero_worker.py"
MICRO_BATCH, GLOBAL_BATCH = 4, 8
# Absolute tolerance on the losses (~0.7 here) and the adapter weights: what is left is fp32 summation order
# (gradients reduced across 2 ranks vs accumulated on 1), ~1e-8 on this model.
TOLERANCE = 1e-6
STAGES = (2, 3)


def _args(tmp_path, output: str, stage: int, world_size: int, **extra) -> dict:
    return dict(model_name_or_path=str(tmp_path / "model"), task_name="sst2", data_dir=str(tmp_path / "data"),
                deepspeed=str(tmp_path / f"zero{stage}.json"), max_seq_length=32, per_device_train_batch_size=MICRO_BATCH,
                gradient_accumulation_steps=GLOBAL_BATCH // (MICRO_BATCH * world_size), learning_rate=1e-2,
                weight_decay=0.1,  # two optimizer groups that differ (matrices decay, biases do not)
                max_steps=4, save_steps=2, logging_steps=1, output_dir=str(tmp_path / f"zero{stage}" / output),
                master_port=0, **extra)


def _launch(tmp_path, name: str, world_size: int, runs: list[dict]):
    (tmp_path / f"{name}.json").write_text(json.dumps(runs))
    port = free_port()
    if world_size == 1:
        command, extra = [BIN / "python", WORKER, tmp_path / f"{name}.json"], {"MASTER_PORT": str(port)}
    else:
        command, extra = [BIN / "torchrun", "--nproc_per_node", world_size, "--master_port", port, WORKER,
                          tmp_path / f"{name}.json"], {}
    result = run(command, timeout=600, extra_env=extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def reshard_runs(tmp_path, stages=STAGES, **settings) -> str:
    """Three launches (1 rank, 2 ranks, 1 rank) for every stage: the uninterrupted runs ws1 and ws2 and the
    resumed ws1_to_ws2 and ws2_to_ws1, in <tmp_path>/zero<stage>/. Returns the launches' stderr."""
    for stage in stages:
        write_preset(tmp_path / f"zero{stage}.json", stage,
                     zero={"stage3_param_persistence_threshold": 0} if stage == 3 else None)

    def runs(name, world_size, **extra):
        return [_args(tmp_path, name, stage, world_size, **settings, **extra) for stage in stages]

    first = _launch(tmp_path, "one_rank", 1, runs("ws1", 1))
    second = _launch(tmp_path, "two_ranks", 2, runs("ws2", 2) + [
        _args(tmp_path, "ws1_to_ws2", stage, 2, **settings,
              resume_from_checkpoint=str(tmp_path / f"zero{stage}" / "ws1" / "checkpoint-2")) for stage in stages])
    third = _launch(tmp_path, "back_to_one", 1, [
        _args(tmp_path, "ws2_to_ws1", stage, 1, **settings,
              resume_from_checkpoint=str(tmp_path / f"zero{stage}" / "ws2" / "checkpoint-2")) for stage in stages])
    return first.stderr + second.stderr + third.stderr


@pytest.fixture(scope="module")
def resharded_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("reshard")
    save_tiny_bert(tmp_path / "model", dropout=0.0)  # re-seeded per-rank RNG: equal runs need no dropout draws
    write_tiny_sst2(tmp_path / "data", train_lines=40, dev_lines=4)
    return tmp_path, reshard_runs(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("original, resumed", [(2, 1), (1, 2)])
def test_a_resume_on_another_world_size_continues_the_same_run(resharded_runs, stage, original, resumed):
    tmp_path, logs = resharded_runs
    runs = tmp_path / f"zero{stage}"
    assert f"zero{stage}/ws{original}/checkpoint-2 from {original} to {resumed} ranks" in logs
    full, continued = train_losses(runs / f"ws{original}"), train_losses(runs / f"ws{original}_to_ws{resumed}")
    assert sorted(continued) == [1, 2, 3, 4]
    print(f"ZeRO-{stage} {original} -> {resumed} ranks: losses 3, 4 {[continued[s] for s in (3, 4)]} "
          f"vs {[full[s] for s in (3, 4)]}")
    for step in (3, 4):
        assert abs(continued[step] - full[step]) <= TOLERANCE, (step, continued[step], full[step])
    exported = [load_file(runs / name / "adapter_model.safetensors")
                for name in (f"ws{original}", f"ws{original}_to_ws{resumed}")]
    assert exported[0].keys() == exported[1].keys()
    for name, tensor in exported[0].items():
        assert torch.allclose(exported[1][name], tensor, rtol=0.0, atol=TOLERANCE), name
    state = json.loads((runs / f"ws{original}_to_ws{resumed}" / "trainer_state.json").read_text())
    assert state["world_size"] == resumed and state["global_step"] == 4
    assert (runs / f"ws{original}" / "checkpoint-2" / "universal" / "deepspeed").is_dir()


@pytest.mark.parametrize("stage, precision", [(1, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16")])
def test_missing_shards_are_named(tmp_path, stage, precision):
    """The files each ZeRO stage writes for 2 ranks (bf16 prefixes the optimizer files); with rank 1's files
    on another host's disk, those are named."""
    folder = tmp_path / "deepspeed"
    folder.mkdir()
    prefix = "bf16_" if precision == "bf16" else ""
    names = [f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]
    names += ([f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in (0, 1)] if stage == 3
              else ["mp_rank_00_model_states.pt"])
    for name in names:
        (folder / name).touch()
    saved = {"world_size": 2, "zero_stage": stage, "precision": precision}
    assert missing_shard_files(tmp_path, saved) == []
    for name in names:
        if "rank_1" in name:
            (folder / name).unlink()
    expected = [f"deepspeed/{prefix}zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    expected += ["deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt"] if stage == 3 else []
    assert missing_shard_files(tmp_path, saved) == expected


def test_stage_0_and_failed_conversions_are_one_line(tmp_path):
    """No ZeRO partitions to convert (stage 0), and a conversion DeepSpeed cannot do (here: unreadable shard
    files): one ValueError line naming the checkpoint; no universal/ directory is left behind."""
    from meft_ds.training.checkpoint import prepare_resharding
    from meft_ds.training.distributed import DistEnv

    env = DistEnv(rank=0, world_size=1, local_rank=0)
    with pytest.raises(ValueError, match=r"with ZeRO stage 0, this run has 1: only ZeRO 1/2/3 checkpoints can be "
                                         r"re-sharded; resume with the same world size\.$"):
        prepare_resharding(tmp_path, {"world_size": 2, "zero_stage": 0}, env)
    (tmp_path / "deepspeed").mkdir()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        (tmp_path / "deepspeed" / name).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"converting to a universal checkpoint \(ZeRO stage 2\) to re-shard it from 2 "
                                         r"to 1 ranks failed on rank 0: ") as error:
        prepare_resharding(tmp_path, {"world_size": 2, "zero_stage": 2}, env)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "universal").exists()
