#!/usr/bin/env bash
# Issue 14's GPU checks in one prepared script, for one call on the GPU machine (README of the
# device tool: the working tree travels, the venv does not; no network there).
#   scripts/gpu_bench.sh [STAGE...]      default stages: sweep kv smoke (about 6 minutes)
# Stages:
#   sweep    bench_head_sweep.py at Pythia-2.8B shape (bf16, layers 15-30, 20 prompts x 32
#            tokens, R_V at 5/28): eager vs compiled sweep, compile time apart, amortised
#            over 3 measurement-layer settings; loops on 32 heads check the sweep's R_V.
#   kv       bench_kv_mixing.py at Mistral-7B shape (10 pairs x 5 alphas x 64 tokens): the
#            batched grid eager, and with the StaticCache + torch.compile decoding prototype.
#   smoke    scripts/gpu_smoke.sh on a random 8-layer Llama (bf16, CUDA).
#   battery  (opt-in, several minutes more) `rloop validate` and the causal battery on a
#            random Mistral-7B-shape model, wall time of each command.
# Every model has random weights built from a config; the tokenizer of the model directories
# is a BPE trained here on the prompt bank (no embedded model or hub there).
# On the device tool: run with command `scripts/gpu_bench.sh` (OUT is set there); results go
# to $OUT (at most 8 files: env.txt, sweep.log, kv.log, smoke.txt, smoke_logs.txt,
# battery.txt, battery_logs.txt, summary.txt). Elsewhere OUT defaults to /tmp/rloop-gpu-bench.
# BUDGET_S (default 480) caps the whole script: each stage gets at most what is left (for
# the battery alone give it more, e.g. BUDGET_S=560 scripts/gpu_bench.sh battery).
# DRY_RUN=1 runs every stage on the CPU with tiny shapes (checks this script, not the GPU).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rloop-gpu-bench}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[[ -x .venv/bin/python && -z ${PYTHON:-} && ${DRY_RUN:-0} == 1 ]] && PY=$PWD/.venv/bin/python
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RLOOP_PROGRESS=0
export RLOOP_CACHE=${RLOOP_CACHE:-/tmp/rloop-cache}
work=${WORK:-/tmp/rloop-gpu-work}
mkdir -p "$work/bin"
# An `rloop` executable without installing the package (PYTHONPATH holds src/).
cat >"$work/bin/rloop" <<EOF
#!/usr/bin/env bash
exec "$PY" -c 'import sys; from rloop.cli import app; sys.argv[0] = "rloop"; app()' "\$@"
EOF
chmod +x "$work/bin/rloop"
export RLOOP="$work/bin/rloop"

stages=("$@")
[[ ${#stages[@]} -eq 0 ]] && stages=(sweep kv smoke)
budget=${BUDGET_S:-480}
started_all=$SECONDS
if [[ ${DRY_RUN:-0} == 1 ]]; then
  device=cpu dtype=float32
else
  device=cuda dtype=bfloat16
fi
summary="$OUT/summary.txt"
: >"$summary"

# left CAP: seconds this stage may run: CAP or what is left of the budget, whichever is less.
left() {
  local rest=$((budget - (SECONDS - started_all)))
  ((rest < $1)) && echo "$rest" || echo "$1"
}

# stage NAME CAP LOG CMD...: run CMD under a time limit, output to LOG, one summary line.
stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local limit t0 rc
  limit=$(left "$cap")
  if ((limit < 20)); then
    echo "skip  $name: budget spent" | tee -a "$summary"
    return
  fi
  t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  if ((rc == 0)); then
    echo "ok    $name ($((SECONDS - t0)) s)" | tee -a "$summary"
  elif ((rc == 124 || rc == 137)); then
    echo "TIME  $name: stopped after $limit s" | tee -a "$summary"
  else
    echo "FAIL  $name ($((SECONDS - t0)) s, rc $rc): $(grep '[[:alnum:]]' "$log" | tail -1)" |
      tee -a "$summary"
  fi
}

# make_model.py DIR KIND DEVICE: a random-weight model directory with a bank-trained
# tokenizer. KIND tiny-llama (8 layers, d 128) | mistral-7b (Mistral-7B's shape, bf16 on disk).
cat >"$work/make_model.py" <<'PYEOF'
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast

from rloop.prompts import bank_versions, load_bank

directory, kind, device = sys.argv[1:4]
texts = [p.text for v in bank_versions() for p in load_bank(v).prompts]
bpe = Tokenizer(models.BPE(unk_token=None))
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(
    vocab_size=8000,
    special_tokens=["<pad>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
)
bpe.train_from_iterator(texts, trainer)
bpe.post_processor = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
)
tok = PreTrainedTokenizerFast(
    tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
)
common = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
if kind == "tiny-llama":
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, **common,
    )
else:
    config = MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
        sliding_window=None, **common,
    )
torch.manual_seed(0)
dtype = torch.bfloat16 if device == "cuda" else torch.float32
with torch.device(device):
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
model.save_pretrained(directory)
tok.save_pretrained(directory)
print(f"{kind}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
      f"tokenizer vocab {len(tok)}, saved to {directory}")
PYEOF

{
  echo "date: $(date -u +%FT%TZ)  stages: ${stages[*]}  dry run: ${DRY_RUN:-0}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
  "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch",
torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
"gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' 2>&1
  git log --oneline -1 2>/dev/null || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

for name in "${stages[@]}"; do
  case $name in
  sweep)
    if [[ ${DRY_RUN:-0} == 1 ]]; then
      args=(--shape pythia-410m --layers 8-11 --measure-layers 2,12 --prompts 2 --tokens 16
        --window 8 --loop-heads 2 --settings 2)
    else
      args=(--shape pythia-2.8b --layers 15-30 --measure-layers 5,28 --prompts 20 --tokens 32
        --loop-heads 32 --settings 3)
    fi
    stage sweep 260 "$OUT/sweep.log" "$PY" bench/bench_head_sweep.py --device "$device" \
      --dtype "$dtype" --compile "${args[@]}"
    ;;
  kv)
    if [[ ${DRY_RUN:-0} == 1 ]]; then
      args=(--model-shape tiny --tokens 16 --static-decode compile)
    else
      args=(--model-shape mistral-7b --static-decode compile)
    fi
    # The per-condition loop (94-122 s on an H100, BENCHMARKS.md) is left out.
    stage kv 200 "$OUT/kv.log" "$PY" bench/bench_kv_mixing.py --device "$device" \
      --dtype "$dtype" --skip-loop "${args[@]}"
    ;;
  smoke)
    [[ -d $work/tiny-llama ]] ||
      stage smoke-model 90 "$work/smoke-model.log" "$PY" "$work/make_model.py" \
        "$work/tiny-llama" tiny-llama "$device"
    if [[ -d $work/tiny-llama ]]; then
      export DEVICE=$device DTYPE=$dtype
      stage smoke 260 "$OUT/smoke.txt" scripts/gpu_smoke.sh "$work/tiny-llama" "$work/smoke-runs"
    fi
    for f in "$work/smoke-model.log" "$work"/smoke-runs/*.log; do
      [[ -e $f ]] && { echo "=== $f"; tail -n 30 "$f"; }
    done >"$OUT/smoke_logs.txt"
    ;;
  battery)
    model="$work/mistral-7b"
    [[ ${DRY_RUN:-0} == 1 ]] && model="$work/tiny-llama"
    if [[ ! -d $model ]]; then
      kind=mistral-7b
      [[ ${DRY_RUN:-0} == 1 ]] && kind=tiny-llama
      stage battery-model 180 "$work/battery-model.log" "$PY" "$work/make_model.py" \
        "$model" "$kind" "$device"
    fi
    common=(--model "$model" --device "$device" --dtype "$dtype")
    all_layers=0-31
    [[ ${DRY_RUN:-0} == 1 ]] && all_layers=0-7
    runs="$work/battery-runs"
    rm -rf "$runs" && mkdir -p "$runs"
    : >"$OUT/battery.txt"
    battery() {
      local name=$1; shift
      stage "$name" 300 "$runs/$name.log" "$RLOOP" "$@" "${common[@]}" --out "$runs/$name"
      tail -n 1 "$summary" >>"$OUT/battery.txt"
    }
    battery validate validate
    battery ablate ablate
    battery ablate-group ablate-group --from-sweep "$runs/ablate"
    battery ablate-layer ablate-layer --layers "$all_layers" --component both
    battery attn-vs-mlp attn-vs-mlp
    battery heads heads
    battery saliency saliency
    battery patch patch --heads 3.1,5.3
    battery attribution attribution --from-sweep "$runs/ablate"
    battery kv-patch kv-patch
    battery temporal temporal
    for f in "$work/battery-model.log" "$runs"/*.log; do
      [[ -e $f ]] && { echo "=== $f"; tail -n 20 "$f"; }
    done >"$OUT/battery_logs.txt"
    ;;
  *)
    echo "unknown stage $name: choose sweep, kv, smoke or battery" | tee -a "$summary"
    ;;
  esac
done
echo "total $((SECONDS - started_all)) s" | tee -a "$summary"
