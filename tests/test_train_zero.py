"""ZeRO 1/2/3 x fp32/bf16 on 2 ranks: one optimizer step of MEFT equals a single-process reference.

The same holds for the cached (--backward vanilla) MEFT path and the LoRA and full fine-tuning baselines.
A ZeRO-3 bf16 run resumed from its step-2 checkpoint ends where the uninterrupted run does.
One torchrun launch trains all configurations (each a fresh DeepSpeed engine in the same process
group) for one step of a global batch of 16 (micro-batch 4 x accumulation 2 x 2 ranks) on a tiny random
BERT and real SST-2 sentences. The reference runs the same global batch through the same model in this
process with plain autograd, torch clipping and torch AdamW.

AdamW's first step is lr * g / (|g| + eps): with the usual eps it is lr * sign(g) and would hide a wrong
gradient scale (e.g. gradients summed instead of averaged over ranks). The test sets eps = 1, where the
step is about lr * g, and lr = 1 so that the update is large against the float32 rounding of the weights.
Clipping is on, at a norm below the gradient's, so the global norm across ZeRO partitions is checked too.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from meft_ds.training.data import collate_fn, load_task_datasets, tokenize_dataset
from meft_ds.training import RunArgs
from meft_ds.training.modeling import build_model, load_tokenizer, make_recipe
from meft_ds.training.trainer import global_batches, micro_batch
from train_helpers import BIN, REPO, free_port, run, save_tiny_bert, train_losses, write_preset, write_tiny_sst2

STAGES = (1, 2, 3)
PRECISIONS = ("fp32", "bf16")
# (ZeRO stage, precision, method, backward): the ZeRO x precision grid of MEFT, then the other paths.
CASES = [(stage, precision, "meft", "reversible") for stage in STAGES for precision in PRECISIONS] + [
    (2, "fp32", "meft", "vanilla"), (2, "fp32", "lora", "reversible"), (3, "fp32", "full", "reversible"),
    (3, "fp32", "meft", "vanilla"), (3, "fp32", "lora", "reversible")]
# Relative error of the weight update (all trainable tensors) and of the step-1 loss, per precision.
# The bf16 reference runs in bf16 too (an fp32 one differs by ~17% on this random model: its gradient is a
# small sum of larger per-example terms); what is left is summation order, ~1e-2 relative in bf16.
UPDATE_TOLERANCE = {"fp32": 1e-5, "bf16": 5e-2}
LOSS_TOLERANCE = {"fp32": 1e-6, "bf16": 1e-2}
MICRO_BATCH, ACCUMULATION, WORLD_SIZE = 4, 2, 2
# ZeRO-3 keeps parameters below 1e5 elements whole by default, i.e. every weight of the tiny model: threshold 0
# partitions them all, so the recompute in the reversible backward runs on weights gathered on demand.
ZERO3_PARTITIONED = {"stage3_param_persistence_threshold": 0}
LEARNING_RATE, EPS, MAX_GRAD_NORM = 1.0, 1.0, 0.005


def _name(case) -> str:
    return "zero{}_{}_{}_{}".format(*case)


def _run_args(tmp_path, case) -> dict:
    stage, precision, method, backward = case
    return dict(
        model_name_or_path=str(tmp_path / "model"), task_name="sst2", data_dir=str(tmp_path / "data"),
        deepspeed=str(tmp_path / f"zero{stage}.json"), bf16=precision == "bf16", method=method, backward=backward,
        max_seq_length=32, per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=ACCUMULATION,
        learning_rate=LEARNING_RATE, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, max_steps=1,
        logging_steps=1, output_dir=str(tmp_path / _name(case)), master_port=0,
        # MEFT in 2 batch slices, and each slice's attention in 2 slices of its sequences: a trainable weight gets
        # its gradient once per slice, which ZeRO must not reduce before the last (MEFTLayer.recompute_backward,
        # reduce_at_last_slice); the reference slices the same way.
        **({"batch_chunks": 2, "attention_chunks": 2} if method == "meft" else {}),
    )


def _reference(kwargs: dict, dtype: torch.dtype):
    """(initial fp32 masters, masters after one step, step loss, gradient norm), computed in one process
    the way DeepSpeed does it: weights loaded in `dtype` as the trainer loads them (fp32 masters copied from them), each rank's
    micro-batch gradients summed in `dtype` with loss / accumulation, then averaged over the ranks.
    MEFT layers use ordinary cached autograd here (backward="vanilla"), the ground truth for both modes."""
    args = RunArgs(**{**kwargs, "backward": "vanilla"})
    tokenizer = load_tokenizer(args.model_name_or_path)
    raw, spec = load_task_datasets(task_name=args.task_name, data_dir=args.data_dir)
    train_set = tokenize_dataset(raw, tokenizer, spec, args.max_seq_length)["train"]
    collate = collate_fn(tokenizer)
    torch.manual_seed(args.seed)  # as the trainer does before building the model
    model = build_model(make_recipe(args, spec, tokenizer), dtype=dtype).train()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    masters = {name: torch.nn.Parameter(p.detach().float().clone()) for name, p in trainable.items()}
    batch = global_batches(len(train_set), MICRO_BATCH * ACCUMULATION * WORLD_SIZE, args.seed, epoch=0)[0]
    losses = []
    for rank in range(WORLD_SIZE):
        model.zero_grad()
        for micro_step in range(ACCUMULATION):
            rows = micro_batch(batch, micro_step, rank, WORLD_SIZE, MICRO_BATCH)
            loss = model(**collate([train_set[i] for i in rows])).loss
            (loss / ACCUMULATION).backward()
            losses.append(loss.item())
        for name, p in trainable.items():
            masters[name].grad = p.grad.float() / WORLD_SIZE + (0 if rank == 0 else masters[name].grad)
    initial = {name: m.detach().clone() for name, m in masters.items()}
    grad_norm = torch.nn.utils.clip_grad_norm_(list(masters.values()), MAX_GRAD_NORM).item()
    optimizer = torch.optim.AdamW(list(masters.values()), lr=LEARNING_RATE, eps=EPS, weight_decay=0.0)
    optimizer.step()
    after = {name: m.detach().clone() for name, m in masters.items()}
    return initial, after, sum(losses) / len(losses), grad_norm


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("zero")
    save_tiny_bert(tmp_path / "model", dropout=0.0)  # dropout masks would differ from the reference's
    write_tiny_sst2(tmp_path / "data", train_lines=64, dev_lines=16)
    for stage in STAGES:
        write_preset(tmp_path / f"zero{stage}.json", stage, zero=ZERO3_PARTITIONED if stage == 3 else None, eps=EPS)
    runs = [_run_args(tmp_path, case) for case in CASES]
    # ZeRO-3 bf16 checkpoint round trip: 4 steps with a checkpoint at 2, and a run resumed from it.
    resume_case = dict(_run_args(tmp_path, (3, "bf16", "meft", "reversible")), learning_rate=1e-2, max_steps=4,
                       save_steps=2, output_dir=str(tmp_path / "zero3_full_run"))
    runs += [resume_case, dict(resume_case, output_dir=str(tmp_path / "zero3_resumed"),
                               resume_from_checkpoint=str(tmp_path / "zero3_full_run" / "checkpoint-2"))]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    result = run([BIN / "torchrun", "--nproc_per_node", "2", "--master_port", free_port(),
                  REPO / "tests" / "train_zero_worker.py", tmp_path / "runs.json"], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    # One reference per method and precision (the reference itself always backpropagates the cached way).
    references = {}
    for case, kwargs in zip(CASES, runs[:len(CASES)]):
        key = (case[1], case[2])
        if key not in references:
            references[key] = _reference(kwargs, torch.bfloat16 if case[1] == "bf16" else torch.float32)
    return tmp_path, references


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_name)
def test_one_step_matches_single_process(zero_runs, case):
    _, precision, method, _ = case
    tmp_path, references = zero_runs
    initial, reference, reference_loss, grad_norm = references[precision, method]
    assert grad_norm > 2 * MAX_GRAD_NORM, "clipping must be active for this test to check the global norm"
    output = tmp_path / _name(case)
    exported = load_file(output / "adapter_model.safetensors")
    assert set(exported) == set(reference)
    names = sorted(reference)
    ds_update = torch.cat([(exported[n] - initial[n]).flatten() for n in names])
    ref_update = torch.cat([(reference[n] - initial[n]).flatten() for n in names])
    error = _relative(ds_update, ref_update)
    loss = train_losses(output)[1]
    print(f"{_name(case)}: relative update error {error:.2e}, loss {loss:.6f} vs {reference_loss:.6f}")
    assert error < UPDATE_TOLERANCE[precision]
    scale = ref_update.abs().max().item()
    for name in names:  # no tensor is off, whatever its share of the total (zero-gradient ones included)
        delta, ref_delta = exported[name] - initial[name], reference[name] - initial[name]
        assert torch.allclose(delta, ref_delta, rtol=0.0, atol=UPDATE_TOLERANCE[precision] * scale), name
    assert abs(loss - reference_loss) / reference_loss < LOSS_TOLERANCE[precision]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_optimizer_state_is_sharded(zero_runs, stage):
    """Each of 2 ranks holds about half of the fp32 master + 2 Adam moments of the trainable weights."""
    tmp_path, references = zero_runs
    initial = references["fp32", "meft"][0]
    results = json.loads((tmp_path / _name((stage, "fp32", "meft", "reversible")) / "results.json").read_text())
    full = 12 * sum(t.numel() for t in initial.values())  # 4 bytes master + 8 bytes moments per weight
    per_rank = results["optimizer_state_bytes_per_rank"]
    print(f"ZeRO-{stage}: optimizer-state bytes per rank {per_rank}, single-rank total {full}")
    assert len(per_rank) == 2
    for value in per_rank:
        assert 0.45 * full < value < 0.55 * full, (per_rank, full)


@pytest.mark.slow
def test_zero3_bf16_resume_continues_the_same_run(zero_runs):
    tmp_path, _ = zero_runs
    full, resumed = train_losses(tmp_path / "zero3_full_run"), train_losses(tmp_path / "zero3_resumed")
    assert sorted(resumed) == [1, 2, 3, 4]
    assert [resumed[s] for s in (3, 4)] == [full[s] for s in (3, 4)]
    exported = [load_file(tmp_path / run / "adapter_model.safetensors") for run in ("zero3_full_run", "zero3_resumed")]
    assert all(torch.equal(exported[0][name], exported[1][name]) for name in exported[0])
