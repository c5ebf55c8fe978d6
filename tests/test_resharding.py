"""A resume with another number of ranks: the checkpoint is converted to DeepSpeed's universal format and
re-sharded (meft_ds.training.checkpoint.prepare_resharding).

2 -> 1 and 1 -> 2 ranks, ZeRO-2 fp32, dropout 0, a tiny random BERT, global batch 8 throughout (2 ranks x
micro-batch 4, or 1 rank x micro-batch 4 x accumulation 2: the same micro-batches, see trainer.global_batches).
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
from train_helpers import BIN, REPO, free_port, run, save_tiny_bert, train_losses, write_tiny_sst2

WORKER = REPO / "tests" / "train_zero_worker.py"
MICRO_BATCH, GLOBAL_BATCH = 4, 8
# Absolute tolerance on the losses (~0.7 here) and the adapter weights: what is left is fp32 summation order
# (gradients reduced across 2 ranks vs accumulated on 1), ~1e-8 on this model.
TOLERANCE = 1e-6


def _args(tmp_path, output: str, world_size: int, **extra) -> dict:
    return dict(model_name_or_path=str(tmp_path / "model"), task_name="sst2", data_dir=str(tmp_path / "data"),
                deepspeed="cpu", max_seq_length=32, per_device_train_batch_size=MICRO_BATCH,
                gradient_accumulation_steps=GLOBAL_BATCH // (MICRO_BATCH * world_size), learning_rate=1e-2,
                max_steps=4, save_steps=2, logging_steps=1, output_dir=str(tmp_path / output), master_port=0, **extra)


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


@pytest.fixture(scope="module")
def resharded_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("reshard")
    save_tiny_bert(tmp_path / "model", dropout=0.0)  # re-seeded per-rank RNG: equal runs need no dropout draws
    write_tiny_sst2(tmp_path / "data", train_lines=40, dev_lines=4)
    _launch(tmp_path, "one_rank", 1, [_args(tmp_path, "ws1", 1)])
    logs = _launch(tmp_path, "two_ranks", 2, [
        _args(tmp_path, "ws2", 2),
        _args(tmp_path, "ws1_to_ws2", 2, resume_from_checkpoint=str(tmp_path / "ws1" / "checkpoint-2"))]).stderr
    logs += _launch(tmp_path, "back_to_one", 1, [
        _args(tmp_path, "ws2_to_ws1", 1, resume_from_checkpoint=str(tmp_path / "ws2" / "checkpoint-2"))]).stderr
    return tmp_path, logs


@pytest.mark.slow
@pytest.mark.parametrize("original, resumed", [(2, 1), (1, 2)])
def test_a_resume_on_another_world_size_continues_the_same_run(resharded_runs, original, resumed):
    tmp_path, logs = resharded_runs
    assert f"checkpoint-2 from {original} to {resumed} ranks" in logs
    full, continued = train_losses(tmp_path / f"ws{original}"), train_losses(tmp_path / f"ws{original}_to_ws{resumed}")
    assert sorted(continued) == [1, 2, 3, 4]
    print(f"{original} -> {resumed} ranks: losses 3, 4 {[continued[s] for s in (3, 4)]} vs {[full[s] for s in (3, 4)]}")
    for step in (3, 4):
        assert abs(continued[step] - full[step]) <= TOLERANCE, (step, continued[step], full[step])
    exported = [load_file(tmp_path / name / "adapter_model.safetensors")
                for name in (f"ws{original}", f"ws{original}_to_ws{resumed}")]
    assert exported[0].keys() == exported[1].keys()
    for name, tensor in exported[0].items():
        assert torch.allclose(exported[1][name], tensor, rtol=0.0, atol=TOLERANCE), name
    state = json.loads((tmp_path / f"ws{original}_to_ws{resumed}" / "trainer_state.json").read_text())
    assert state["world_size"] == resumed and state["global_step"] == 4
    assert (tmp_path / f"ws{original}" / "checkpoint-2" / "universal" / "deepspeed").is_dir()


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
