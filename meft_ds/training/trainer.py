"""The training loop: data, model, DeepSpeed engine, steps, evaluation, checkpoints, export, results.json.

Data order is a function of (seed, epoch) and the global batch only: each epoch permutes the training set
once, cuts it into global batches (the last partial one is dropped, so every rank gets equal micro-batches),
and micro-step k of rank r takes slice k * world + r of the global batch. A run therefore sees the same
global batches whatever the world size / accumulation split, and a resumed run continues mid-epoch
exactly where the interrupted one was.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.distributed as dist

from ..reversible import MEFTStack
from .data import TaskSpec, collate_fn, load_task_datasets, tokenize_dataset
from .metrics import compute_metrics, lm_loss_sums, lm_metrics
from .telemetry import RankTelemetry, optimizer_state_bytes, param_bytes
from .args import RunArgs
from .checkpoint import (TRAINER_STATE, export_adapter, load_checkpoint, prepare_resharding, probe_output_disks,
                         resolve_resume_path, save_checkpoint)
from .distributed import DistEnv, all_gather_floats, all_gather_objects, barrier, init_distributed, local_main_first
from .ds_config import load_preset, merge_ds_config, resolve_preset, zero_stage
from .modeling import (ModelRecipe, build_model, check_sequence_length, init_regression_bias, load_tokenizer,
                       make_recipe, num_parameters, param_groups, regression_start, release_weights_after_recompute)
from .same_inputs import check_same_inputs

logger = logging.getLogger("meft_ds.train")


def global_batches(num_examples: int, global_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's global batches of example indices (a seeded permutation; last partial batch dropped)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [order[i * global_batch_size:(i + 1) * global_batch_size] for i in range(num_examples // global_batch_size)]


def micro_batch(batch: list[int], micro_step: int, rank: int, world_size: int, micro_batch_size: int) -> list[int]:
    start = (micro_step * world_size + rank) * micro_batch_size
    return batch[start:start + micro_batch_size]


def linear_schedule(total_steps: int, warmup_steps: int):
    """lr factor of step s (0-based): warm-up (s + 1) / (warmup_steps + 1), so no step runs at lr 0, then
    linear decay from 1 to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


class NonFiniteError(RuntimeError):
    """A training step's loss or gradient norm was not finite and the run stops (--nonfinite, docs/errors.md)."""


# --nonfinite skip (bf16/fp32): this many non-finite steps in a row mean the run diverged, not a stray batch.
MAX_CONSECUTIVE_NONFINITE = 10


class NonFiniteGuard:
    """Checks each optimizer step's loss (all ranks) and gradient norm; decides to go on or to stop.

    Uses only what the step already computed: the per-rank losses gathered for logging and DeepSpeed's
    global gradient norm and overflow decision (both reduced across ranks inside engine.step()). Every
    rank therefore takes the same decision. DeepSpeed skips a step whose gradients are not finite (ZeRO
    with fp16 or bf16 always, fp32 when it computes the gradient norm); with fp16 that skip, and the loss
    scale it lowers, is the normal path. Otherwise `policy` says: "stop" raises NonFiniteError (nothing
    is saved or exported afterwards); "skip" goes on unless MAX_CONSECUTIVE_NONFINITE steps in a row were
    skipped. A non-finite step that DeepSpeed applied anyway always stops: the weights are no longer finite.

    locate: optional callable returning where the step's forward first went non-finite, in words (or None when
    not known), called on every rank at once, only for a non-finite step that is not fp16's normal skip
    (`locate_nonfinite`: a collective).
    """

    def __init__(self, policy: str, fp16: bool, rank: int, locate=None):
        self.policy, self.fp16, self.rank, self.locate = policy, fp16, rank, locate
        self.consecutive = 0

    def check(self, step: int, rank_losses: list[float], grad_norm, applied: bool) -> bool:
        """True when the step counts as trained; False when it was skipped (logged). Raises NonFiniteError."""
        grad_norm = None if grad_norm is None else float(grad_norm)
        bad_ranks = [r for r, value in enumerate(rank_losses) if not math.isfinite(value)]
        norm_ok = grad_norm is None or math.isfinite(grad_norm)
        if not bad_ranks and norm_ok and applied:
            self.consecutive = 0
            return True
        what = (f"step {step}: " + (f"non-finite loss on rank {', '.join(map(str, bad_ranks))} "
                                    f"({', '.join(str(rank_losses[r]) for r in bad_ranks)})" if bad_ranks else "loss finite")
                + f", gradient norm {grad_norm}")
        where = self.locate() if self.locate is not None and not (self.fp16 and not applied) else None
        if where:
            what += f", first non-finite stream: {where}"
        if applied:
            raise NonFiniteError(f"{what}, and the optimizer applied this step (DeepSpeed checked no gradient "
                                 "overflow: ZeRO stage 0 fp32, or gradient-norm computation off), so the weights are "
                                 "no longer trustworthy; the run stops without saving or exporting them.")
        self.consecutive += 1
        if self.fp16:
            logger.warning("%s: step skipped by the fp16 loss scaler (it lowers the loss scale)", what)
            return False
        if self.policy == "stop":
            raise NonFiniteError(f"{what}: DeepSpeed skipped the step, and --nonfinite stop ends the run here "
                                 f"(rank {self.rank} reporting); --nonfinite skip would continue past such steps.")
        if self.consecutive >= MAX_CONSECUTIVE_NONFINITE:
            raise NonFiniteError(f"{what}: {self.consecutive} non-finite steps in a row, the run diverged "
                                 f"(--nonfinite skip stops after {MAX_CONSECUTIVE_NONFINITE}).")
        logger.warning("%s: step skipped (--nonfinite skip; %d in a row)", what, self.consecutive)
        return False


def locate_nonfinite(stacks: list, env: DistEnv) -> str | None:
    """Where each rank's MEFT streams first went non-finite in this step's forwards (MEFTStack.first_nonfinite_layer),
    gathered from every rank; None when no rank knows (no MEFT stack, float arithmetic). Collective."""
    local = "; ".join(d for d in (stack.first_nonfinite_layer() for stack in stacks) if d) or None
    found = all_gather_objects(local) if env.world_size > 1 else [local]
    return ", ".join(f"rank {rank}: {where}" for rank, where in enumerate(found) if where) or None


def _to_device(batch: dict, device) -> dict:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def evaluate(engine, dataset, spec, collate, env: DistEnv, batch_size: int) -> dict:
    """Metrics on one split. Every rank runs the same number of batches (ZeRO-3 gathers weights
    collectively), padding its shard with repeats that are dropped before scoring."""
    n = len(dataset)
    per_rank = math.ceil(n / env.world_size)
    indices = [(env.rank + env.world_size * k) % n for k in range(per_rank)]
    real = [env.rank + env.world_size * k < n for k in range(per_rank)]
    outputs, lm_sums = [], torch.zeros(3, dtype=torch.float64, device=engine.device)
    # No key/value cache: nothing is generated, and with one the reversible stack runs the attention unsliced
    # (MEFTConfig.attention_chunks), a module order ZeRO-3 has not recorded.
    no_cache = {"use_cache": False} if "use_cache" in inspect.signature(engine.module.forward).parameters else {}
    engine.eval()
    with torch.no_grad():
        for start in range(0, per_rank, batch_size):
            rows = indices[start:start + batch_size]
            keep = real[start:start + batch_size]
            batch = _to_device(collate([dataset[i] for i in rows]), engine.device)
            # Without labels: the model would also compute its own mean loss over an fp32 copy of all logits.
            logits = engine(**{name: t for name, t in batch.items() if name != "labels"}, **no_cache).logits
            if spec.is_causal_lm:  # reduced on the device: only 3 numbers per rank leave it, at the end
                kept = torch.tensor(keep, device=logits.device)
                lm_sums += lm_loss_sums(logits[kept], batch["labels"][kept])
            else:
                outputs += [(i, row.tolist()) for i, row, k in zip(rows, logits.float().cpu(), keep) if k]
    engine.train()
    if spec.is_causal_lm:
        totals = all_gather_floats(lm_sums.tolist())
        loss_sum, num_tokens, num_correct = (sum(t[k] for t in totals) for k in range(3))
        return lm_metrics(loss_sum, int(num_tokens), int(num_correct))
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, outputs)
    by_index = dict(pair for part in gathered for pair in part)
    predictions, labels = torch.tensor([by_index[i] for i in range(n)]), torch.tensor(list(dataset["labels"]))
    return {"loss": eval_loss(spec, predictions, labels), **compute_metrics(spec, predictions.numpy(), labels.numpy())}


def eval_loss(spec, predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean loss over the split (cross-entropy, or MSE for regression), as the model's head computes it."""
    if spec.is_regression:
        return torch.nn.functional.mse_loss(predictions.view(-1), labels.float()).item()
    return torch.nn.functional.cross_entropy(predictions, labels).item()


def _setup_logging(env: DistEnv) -> None:
    level = logging.INFO if env.is_main else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=level)
    if not env.is_main:
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()


@dataclass
class Run:
    """A run ready to train: everything `setup` built, and the trainer state (resumed or fresh)."""

    args: RunArgs
    env: DistEnv
    ds_config: dict
    spec: TaskSpec
    data: datasets.DatasetDict
    collate: object
    recipe: ModelRecipe
    engine: object
    optimizer: object
    scheduler: object
    total_steps: int
    steps_per_epoch: int
    global_batch_size: int
    trainable_parameters: int
    state: dict


def setup(args: RunArgs) -> Run:
    """Check inputs, load data and model, build the engine, resume if asked; nothing is written yet.

    Raises FileNotFoundError / FileExistsError / ValueError for bad inputs (the launcher prints them as
    one line). Safe to call several times in one process: the process group is set up once.
    """
    import deepspeed

    env = init_distributed(args.master_port, args.ddp_timeout)
    _setup_logging(env)
    args.check_inputs()
    source = str(resolve_preset(args.deepspeed))
    ds_config, args = merge_ds_config(load_preset(args.deepspeed), args, env.world_size, source=source)
    check_precision_supported(args, source)
    check_same_inputs(args, source, env)
    resume_path = None
    if args.resume_from_checkpoint:
        resume_path = resolve_resume_path(args.resume_from_checkpoint, args.output_dir, env)

    from transformers import AutoConfig

    from .. import plan

    model_config = AutoConfig.from_pretrained(args.model_name_or_path)
    check_sequence_length(model_config, args.max_seq_length)
    tokenizer = load_tokenizer(args.model_name_or_path)
    with local_main_first(env):
        raw, spec = load_task_datasets(task_name=args.task_name, data_dir=args.data_dir, train_file=args.train_file,
                                       validation_file=args.validation_file, lm=args.lm)
        data = tokenize_dataset(raw, tokenizer, spec, args.max_seq_length)
    micro_size, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    global_size = micro_size * accumulation * env.world_size
    steps_per_epoch = len(data["train"]) // global_size
    if steps_per_epoch == 0:
        raise ValueError(f"The training set has {len(data['train'])} examples, fewer than one global batch of "
                         f"{global_size} (per_device_train_batch_size x gradient_accumulation_steps x world size).")
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)

    torch.manual_seed(args.seed)  # adapter / head init; dropout draws continue from here (saved per checkpoint)
    recipe = make_recipe(args, spec, tokenizer)
    identity = run_identity(recipe, ds_config, args)
    universal = None
    if resume_path is not None:
        saved = json.loads((resume_path / TRAINER_STATE).read_text())
        check_same_run(saved, identity, resume_path)
        if saved["global_batch_size"] != global_size:
            raise ValueError(f"{resume_path} was trained with global batch {saved['global_batch_size']}, this run "
                             f"has {global_size}; resume with the same global batch (per_device_train_batch_size x "
                             "gradient_accumulation_steps x world size) so the data order continues.")
        if total_steps < saved["global_step"]:
            raise ValueError(f"{resume_path} is at step {saved['global_step']}, past this run's {total_steps} steps "
                             "(--max_steps / --num_train_epochs); pass a larger --max_steps to train on.")
        if saved["world_size"] != env.world_size:  # re-shard through DeepSpeed's universal checkpoint format
            universal = prepare_resharding(resume_path, saved, env)
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    model = build_model(recipe, dtype=_torch_dtype(args), ds_config=ds_config)
    if spec.is_regression:  # a resume then loads the trained bias over it
        label_start = regression_start(data["train"]["labels"])
        set_biases = init_regression_bias(model, label_start)
        if set_biases:
            logger.info("regression head: %s starts at the mean training label (the central 80%%) %.4g",
                        ", ".join(set_biases), label_start)
        else:
            logger.warning("regression head has no bias to start at the mean training label (%.4g): labels far "
                           "from 0 make the first steps fit their offset, and at a high learning rate the model may "
                           "collapse to a constant (docs/quality.md); centring the labels avoids it", label_start)
    trainable, total_parameters = num_parameters(model, trainable_only=True), num_parameters(model)
    schedule = linear_schedule(total_steps, warmup_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, args.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    release_weights_after_recompute(engine)
    logger.info("world size %d | global batch %d = %d x %d accumulation x %d ranks | %d steps (%d per epoch), "
                "%d warm-up | %s | ZeRO-%d | %s | trainable parameters %d of %d (%.2f%%)",
                env.world_size, global_size, micro_size, accumulation, env.world_size, total_steps, steps_per_epoch,
                warmup_steps, args.method, zero_stage(ds_config), _precision(args), trainable, total_parameters,
                100.0 * trainable / total_parameters)
    if recipe.meft_config is not None:
        logger.info("MEFT: %s", json.dumps(recipe.meft_config, sort_keys=True))
    offload = _offload_device(ds_config) not in (None, "none")
    try:  # an estimate for the log: a model the planner cannot count must not stop a run that can train
        line = plan.run_line(model_config, method=args.method, stage=zero_stage(ds_config), offload=offload,
                             world_size=env.world_size, max_seq_length=args.max_seq_length, micro_batch=micro_size,
                             precision=_precision(args), task=spec.kind, meft_config=recipe.meft_config)
    except Exception as error:  # noqa: BLE001 - said in the log, in one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        line = f"plan: not available for this run ({type(error).__name__}: {reason})"
    logger.info("%s", line)

    state = {"global_step": 0, "world_size": env.world_size, "global_batch_size": global_size, "log_history": [],
             "total_steps": total_steps, **identity}
    if resume_path is not None:
        state = load_checkpoint(engine, resume_path, env, universal=universal, seed=args.seed)
        logger.info("resumed from %s at step %d", resume_path, state["global_step"])
        continue_schedule(scheduler, schedule, state.get("total_steps"), total_steps, warmup_steps, state["global_step"])
        state.update(total_steps=total_steps, world_size=env.world_size, **identity)
    barrier()  # every rank passed every check before rank 0 writes anything
    return Run(args, env, ds_config, spec, data, collate_fn(tokenizer), recipe, engine, optimizer, scheduler,
               total_steps, steps_per_epoch, global_size, trainable, state)


# Fields of the run identity a resumed run may change: the base model may have moved, and the backward mode
# computes the same function (it only trades memory for recomputation).
MAY_DIFFER_ON_RESUME = ("model_recipe.base_model_name_or_path", "model_recipe.meft_config.backward")


def run_identity(recipe: ModelRecipe, ds_config: dict, args: RunArgs) -> dict:
    """What makes a resumed run the same run, stored in every checkpoint's trainer_state.json: the model
    recipe (the record adapter_config.json holds: one schema), the ZeRO stage, the precision and the
    optimizer (type and settings, e.g. lr, betas, eps, weight decay)."""
    return {"model_recipe": recipe.to_dict(), "zero_stage": zero_stage(ds_config),
            "precision": _precision(args), "optimizer": ds_config.get("optimizer")}


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def check_same_run(saved_state: dict, identity: dict, path) -> None:
    """Raise ValueError (one line, naming every differing field) unless the checkpoint in `path` was made
    by the same run as `identity` describes. Checkpoints written before these fields existed are let through
    with a warning."""
    if "model_recipe" not in saved_state:
        logger.warning("%s predates the run-identity check: its model recipe and ZeRO settings are not verified", path)
        return
    saved, current = _flatten({k: saved_state.get(k) for k in identity}), _flatten(identity)
    fields = list(current) + [field for field in saved if field not in current]  # recipe order: variant first
    differing = [f"{field}={saved.get(field)!r}, this run has {current.get(field)!r}" for field in fields
                 if field not in MAY_DIFFER_ON_RESUME and saved.get(field) != current.get(field)]
    if differing:
        raise ValueError(f"{path} was trained with {'; '.join(differing)}. Resume with the same settings, or start "
                         "a new run in another --output_dir.")


def continue_schedule(scheduler, schedule, saved_total: int | None, total_steps: int, warmup_steps: int,
                      step: int) -> None:
    """A resume with another step count continues on the schedule recomputed for the new count.

    The loaded scheduler already uses the new schedule for every later step, but the learning rate of the next
    step was set by the old one (0.0 after a finished run's last step). It is set from the new schedule at the
    scheduler's own step count, and logged; with an unchanged count nothing changes.
    """
    if saved_total is None or saved_total == total_steps:
        return
    factor = schedule(scheduler.last_epoch)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr() reads
    logger.info("the checkpoint was made for %d steps, this run has %d: the learning-rate schedule is recomputed "
                "for %d steps (%d warm-up): step %d runs at lr %.3g (factor %.3g of the peak)",
                saved_total, total_steps, total_steps, warmup_steps, step + 1, scheduler.get_last_lr()[0], factor)


def check_precision_supported(args: RunArgs, source: str) -> None:
    """Raise ValueError (one line) when the run asks for fp16 and DeepSpeed's accelerator says it has none.

    The accelerator is asked, not assumed: some CPUs (AVX512-FP16) do support fp16, most do not.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if args.fp16 and not accelerator.is_fp16_supported():
        raise ValueError(f"fp16 (from {source} or --fp16) is not supported on this {accelerator.device_name()} "
                         "accelerator; use --bf16 or fp32 here, fp16 on a GPU.")


def _torch_dtype(args: RunArgs) -> torch.dtype:
    """The weights' dtype in training: DeepSpeed casts every parameter to 16 bit when bf16/fp16 is on."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def _offload_device(ds_config: dict) -> str | None:
    """Where ZeRO keeps the optimizer state: None (on the device), "none", "cpu" or "nvme"."""
    return ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")


def _precision(args: RunArgs) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def fit(run: Run) -> dict:
    """Train to run.total_steps with periodic eval/checkpoints; then evaluate, export the adapter and
    write results.json and trainer_state.json. Returns the results (on every rank).

    TensorBoard: run-level scalars (the all-rank mean loss, learning rate, eval metrics) in
    args.logging_dir; every rank's memory, throughput and own loss in <logging_dir>/rank_<r>/
    (meft_ds.training.telemetry, gathered to rank 0 once per log step; docs/telemetry.md)."""
    from tqdm.auto import tqdm

    args, env, engine, state = run.args, run.env, run.engine, run.state
    train_set, accumulation = run.data["train"], args.gradient_accumulation_steps
    output_dir = Path(args.output_dir)
    writer = None
    commits = probe_output_disks(args.output_dir, env)  # which rank commits checkpoints on this rank's disk
    if env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.logging_dir)

    def log(entry: dict) -> None:
        state["log_history"].append(entry)
        if writer is not None:
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, entry["step"])
        logger.info(json.dumps(entry))

    def run_eval() -> dict:
        eval_batch_size = args.per_device_eval_batch_size or args.per_device_train_batch_size
        results = {split: evaluate(engine, run.data[split], run.spec, run.collate, env, eval_batch_size)
                   for split in run.spec.eval_splits}
        log({"step": state["global_step"],
             **{f"eval/{split}/{name}": value for split, m in results.items() for name, value in m.items()}})
        return results

    engine.train()  # from_pretrained returns the model in eval mode: dropout would stay off
    telemetry = RankTelemetry(engine.module, run.optimizer, engine.device, logging_dir=args.logging_dir,
                              rank=env.rank, world_size=env.world_size, logging_steps=args.logging_steps,
                              last_step=run.total_steps, reconstruction_error_steps=args.reconstruction_error_steps,
                              log_saved_bytes=args.log_saved_bytes)
    progress = tqdm(total=run.total_steps, initial=state["global_step"], disable=not env.is_main, desc="train",
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)  # a log file gets a line per 30 s
    start_step, start_time, epoch, batches = state["global_step"], time.perf_counter(), None, []
    stacks = [module for module in engine.module.modules() if isinstance(module, MEFTStack)]
    guard = NonFiniteGuard(args.nonfinite, bool(args.fp16), env.rank, locate=lambda: locate_nonfinite(stacks, env))
    run_losses = []
    try:  # closed on any exit, so that an error line starts on a line of its own, not after the bar
        while state["global_step"] < run.total_steps:
            step = state["global_step"]
            step_start = time.perf_counter()
            if step // run.steps_per_epoch != epoch:
                epoch = step // run.steps_per_epoch
                batches = global_batches(len(train_set), run.global_batch_size, args.seed, epoch)
            batch_indices = batches[step % run.steps_per_epoch]
            learning_rate = run.scheduler.get_last_lr()[0]
            telemetry.begin_step(step + 1)
            for stack in stacks:
                stack.reset_nonfinite_record()  # so that a non-finite step names its own first bad layer
            loss_sum, samples, tokens = torch.zeros(()), 0, 0
            for micro_step in range(accumulation):
                rows = micro_batch(batch_indices, micro_step, env.rank, env.world_size,
                                   args.per_device_train_batch_size)
                batch = run.collate([train_set[i] for i in rows])
                samples, tokens = samples + len(rows), tokens + int(batch["attention_mask"].sum())  # on the host
                with telemetry.forward():
                    loss = engine(**_to_device(batch, engine.device)).loss
                engine.backward(loss)
                telemetry.after_backward(last_micro_step=micro_step == accumulation - 1)
                engine.step()
                loss_sum += loss.detach().float().cpu()
            rank_loss = (loss_sum / accumulation).item()
            rank_losses = [values[0] for values in all_gather_floats([rank_loss])]
            loss_value = sum(rank_losses) / len(rank_losses)
            state["global_step"] = step = step + 1
            guard.check(step, rank_losses, engine.get_global_grad_norm(), engine.was_step_applied())
            run_losses.append(loss_value)
            telemetry.end_step(step, time.perf_counter() - step_start, samples, tokens, rank_loss, learning_rate)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{learning_rate:.2e}", refresh=False)
            if telemetry.is_log_step(step):
                log({"step": step, "epoch": round(step / run.steps_per_epoch, 4), "train/loss": loss_value,
                     "train/learning_rate": learning_rate})
            if args.eval_steps and step % args.eval_steps == 0 and step < run.total_steps:
                run_eval()
            if args.save_steps and step % args.save_steps == 0 and step < run.total_steps:
                save_checkpoint(engine, args.output_dir, state, env, commits)
    finally:
        progress.close()
    telemetry.close()
    train_seconds = time.perf_counter() - start_time
    optimizer_bytes = None
    if state["global_step"] > 0:  # Adam's moments exist from the first step on (or from the checkpoint)
        optimizer_bytes = [int(b[0]) for b in all_gather_floats([float(optimizer_state_bytes(run.optimizer))])]
        logger.info("optimizer-state bytes per rank: %s (total %d)", optimizer_bytes, sum(optimizer_bytes))
    # What each rank holds of the weights themselves (ZeRO-3: its shards; ZeRO-1/2: every weight).
    parameter_bytes = all_gather_floats([float(param_bytes(engine.module, trainable=False)),
                                         float(param_bytes(engine.module, trainable=True))])

    eval_results = run_eval() if run.spec.eval_splits else {}
    for split, metrics in eval_results.items():
        if metrics.get("constant_predictions"):
            logger.warning("eval %s: the model predicts the same value for every example (collapsed: lower the "
                           "learning rate or check the head); results.json records constant_predictions", split)
    steps_run = state["global_step"] - start_step
    if args.save_steps and steps_run:  # the last checkpoint, its log history ending with the final eval
        save_checkpoint(engine, args.output_dir, state, env, commits)
    export_adapter(engine, run.recipe, args.output_dir, env)
    peak_gpu_memory = None
    if torch.cuda.is_available():  # allocator peak; on CPU DeepSpeed's memory figures are process RSS
        peak_gpu_memory = [int(b[0]) for b in all_gather_floats([float(torch.cuda.max_memory_allocated())])]
    results = {
        "global_step": state["global_step"],
        "train_loss": sum(run_losses) / len(run_losses) if run_losses else None,
        "train_runtime_s": round(train_seconds, 3),
        "train_steps_per_second": round(steps_run / train_seconds, 4) if steps_run else None,
        "train_samples_per_second": round(steps_run * run.global_batch_size / train_seconds, 3) if steps_run else None,
        "eval": eval_results,
        "optimizer_state_bytes_per_rank": optimizer_bytes,
        "frozen_parameter_bytes_per_rank": [int(b[0]) for b in parameter_bytes],
        "trainable_parameter_bytes_per_rank": [int(b[1]) for b in parameter_bytes],
        "peak_gpu_memory_bytes_per_rank": peak_gpu_memory,
        "trainable_parameters": run.trainable_parameters,
        "world_size": env.world_size,
        "zero_stage": zero_stage(run.ds_config),
        "precision": _precision(args),
        "method": args.method,
        "task_name": run.spec.task_name,
    }
    if env.is_main:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (output_dir / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        for split, metrics in eval_results.items():
            print(f"eval {split}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
        writer.close()
    barrier()
    return results


def train(args: RunArgs) -> dict:
    """setup + fit: one whole run."""
    return fit(setup(args))
