"""ZeRO-3 with every weight partitioned (stage3_param_persistence_threshold 0), on 2 ranks, through the trainer.

A tiny OPT (3 layers: 1 frozen, 2 reversible MEFT layers; causal-LM data) is trained 3 steps with bf16 by
tests/zero3_partition_worker.py, which records where each layer's weights are while the reversible backward
runs. DeepSpeed's prefetch bucket, live-parameter budget and reuse distance are set to a fraction of a layer
so that the tiny model behaves like a big one (by default DeepSpeed would prefetch all of it at once).
The same run with offload_param to CPU, and one with DeepSpeed's default persistence threshold (every tiny
weight kept whole), must train identically. The gradient equality with a
single-process reference under this partitioning is test_train_zero.py's (its ZeRO-3 preset uses threshold 0).
"""

from __future__ import annotations

import json

import pytest

from train_helpers import BIN, REPO, free_port, run, save_tiny_opt, train_losses, write_preset

# A tiny OPT layer has ~8.5k weights: prefetch at most ~half a layer ahead, keep at most ~3.5 layers gathered.
SMALL_MODEL_AS_BIG = {"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 5000,
                      "stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 30000}
OFFLOADS = ("none", "cpu")
STEPS = 3


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("zero3_partitioned")
    model = save_tiny_opt(tmp_path / "opt")
    runs = []
    for offload in OFFLOADS + ("persistent",):
        zero = dict(SMALL_MODEL_AS_BIG, **({"offload_param": {"device": "cpu"}} if offload == "cpu" else {}))
        if offload == "persistent":  # DeepSpeed's default threshold: every tiny weight is kept whole
            del zero["stage3_param_persistence_threshold"]
        preset = write_preset(tmp_path / f"zero3_{offload}.json", 3, zero=zero)
        runs.append(dict(model_name_or_path=str(model), lm=True, train_file=str(REPO / "data" / "lm_example.jsonl"),
                         validation_file=str(REPO / "data" / "lm_example.jsonl"), deepspeed=str(preset), bf16=True,
                         max_steps=STEPS, per_device_train_batch_size=2, max_seq_length=64, logging_steps=1,
                         master_port=0, output_dir=str(tmp_path / offload)))
    # The attention of each layer in slices of the batch's sequences (MEFTConfig.attention_chunks), evaluation too;
    # one evaluation batch per rank, so that no batch has fewer sequences than slices (that batch would run fewer
    # slices, a module order DeepSpeed has not recorded: docs/method.md).
    runs.append(dict(runs[0], attention_chunks=2, per_device_eval_batch_size=64,
                     output_dir=str(tmp_path / "attention_chunks")))
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    result = run([BIN / "torchrun", "--nproc_per_node", "2", "--master_port", free_port(),
                  REPO / "tests" / "zero3_partition_worker.py", tmp_path / "runs.json"], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {offload: [json.loads((tmp_path / offload / f"partition_rank{r}.json").read_text()) for r in (0, 1)]
            for offload in OFFLOADS + ("attention_chunks",)}, tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("offload", OFFLOADS)
def test_no_rank_holds_the_model(reports, offload):
    """Right after setup every parameter is a ZeRO-3 parameter, none is held whole and each rank's shards
    are half the model (plus per-tensor padding)."""
    for report in reports[0][offload]:
        setup = report["setup"]
        assert setup["all_zero_params"]
        assert setup["held_numel"] == 0
        assert 0.5 <= setup["shard_numel"] / setup["total_numel"] < 0.51, setup


@pytest.mark.slow
@pytest.mark.parametrize("offload", OFFLOADS)
def test_reversible_backward_gathers_one_layer_at_a_time(reports, offload):
    """In backward each reversible layer's weights are partitioned until its recomputation (on step 1, when
    DeepSpeed is still recording its module trace and prefetches nothing), whole while it is recomputed,
    and partitioned again as soon as backward is done with the layer."""
    for report in reports[0][offload]:
        visits = report["backward_steps"]
        assert [(v["step"], v["layer"]) for v in visits] == [(s, i) for s in range(1, STEPS + 1) for i in (1, 0)]
        for visit in visits:
            assert visit["exit"] == ["NOT_AVAILABLE"], visit
            if visit["step"] == 1:
                assert visit["entry"] == ["NOT_AVAILABLE"] and visit["others_entry"] == ["NOT_AVAILABLE"], visit
        assert report["recompute"] and all(r["whole"] for r in report["recompute"])
        assert {r["step"] for r in report["recompute"]} == set(range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("offload", OFFLOADS + ("attention_chunks",))
def test_prefetch_follows_the_reversible_order(reports, offload):
    """DeepSpeed records the module order of a whole forward + backward on step 1 (the reversible
    recomputation included, top layer first) and prefetches along it from step 2: the trace is never
    discarded and no weight of a reversible layer is fetched on demand inside the recomputation."""
    for report in reports[0][offload]:
        assert report["invalidated_traces"] == []
        on_demand = [g for g in report["gathers"] if g["phase"] == "reversible" and g["step"] > 1
                     and g["kind"] == "demand" and set(g["layers"]) - {-1}]
        assert on_demand == [], on_demand
        prefetched = [g for g in report["gathers"] if g["step"] > 1 and g["kind"] == "prefetch"
                      and g["phase"] in ("backward", "reversible") and set(g["layers"]) - {-1}]
        assert prefetched, "nothing of the reversible layers was prefetched in backward"


@pytest.mark.slow
def test_offload_and_persistence_train_identically(reports):
    """offload_param to CPU, and weights kept whole (persistent: the release after each layer's backward
    partitions them too, and DeepSpeed gathers them again on their next use), give the same losses."""
    _, tmp_path = reports
    losses = {offload: train_losses(tmp_path / offload) for offload in OFFLOADS + ("persistent",)}
    assert sorted(losses["none"]) == list(range(1, STEPS + 1))
    assert losses["cpu"] == losses["none"] and losses["persistent"] == losses["none"]
