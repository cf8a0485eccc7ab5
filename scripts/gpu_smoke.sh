#!/usr/bin/env bash
# Run every rloop experiment once on a CUDA device with a small model directory, bf16, and
# report each command's exit status and wall time (the CPU test suite cannot reach the CUDA
# code paths).
#   scripts/gpu_smoke.sh MODEL_DIR [RUNS_DIR]
# MODEL_DIR: any supported model saved with save_pretrained (weights + tokenizer); a random
# 8-layer Llama with the embedded model's tokenizer is enough (scripts/gpu_bench.sh builds one
# with a tokenizer trained on the prompt bank, where no embedded model is installed).
# Exits non-zero if any command failed; a command this checkout does not have yet (its
# `rloop CMD --help` fails) is reported as "skip ... not available" and does not fail the run.
# DEVICE=cpu DTYPE=float32 runs the same list on the CPU; RLOOP="python -m ..." picks the
# rloop executable; ONLY="ablate validate" runs only the named entries. Making a model dir:
#   python -c 'import torch; from transformers import AutoModelForCausalLM, LlamaConfig
#   from rloop.models import load_model; tok = load_model("smollm2-135m").tokenizer
#   cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
#       num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
#   AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained("tiny-llama")
#   tok.save_pretrained("tiny-llama")'
set -u
model=${1:?usage: scripts/gpu_smoke.sh MODEL_DIR [RUNS_DIR]}
runs=${2:-/tmp/rloop-gpu-smoke}
rloop=${RLOOP:-rloop}
common=(--model "$model" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}")
failed=0
declare -A available=() helps=()

# probe CMD...: run `rloop CMD --help` for every command at once (in parallel: each one pays
# Python's start-up) and remember which succeed.
probe() {
  local dir cmd
  dir=$(mktemp -d)
  for cmd in "$@"; do
    ($rloop "$cmd" --help >"$dir/$cmd.help" 2>&1 && touch "$dir/$cmd.ok") &
  done
  wait
  for cmd in "$@"; do
    if [[ -e $dir/$cmd.ok ]]; then available[$cmd]=1; else available[$cmd]=0; fi
    helps[$cmd]=$(cat "$dir/$cmd.help")
  done
  rm -rf "$dir"
}


# has CMD: whether `rloop CMD --help` succeeded (probed on first use).
has() {
  [[ -n ${available[$1]+x} ]] || probe "$1"
  [[ ${available[$1]} == 1 ]]
}

# run NAME CMD ARGS...: run `rloop CMD ARGS... --out RUNS/NAME`, log to RUNS/NAME.log.
run() {
  local name=$1 cmd=$2; shift 2
  if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then return; fi
  if ! has "$cmd"; then
    echo "skip  $name: rloop $cmd not available"
    return
  fi
  local started=$SECONDS
  if $rloop "$cmd" "$@" --out "$runs/$name" >"$runs/$name.log" 2>&1; then
    echo "ok    $name ($((SECONDS - started)) s)"
  else
    echo "FAIL  $name ($((SECONDS - started)) s): $(grep '[[:alnum:]]' "$runs/$name.log" | tail -1)"
    failed=1
  fi
}

# run_new NAME CMD [ARGS...]: for commands added after this script was written (their options
# are not known here): ARGS plus whichever of the usual small-run options `rloop CMD --help`
# lists.
run_new() {
  local name=$1 cmd=$2; shift 2
  local extra=() help
  if has "$cmd"; then
    help=${helps[$cmd]}
    [[ $help == *--measure-layers* ]] && extra+=(--measure-layers 1,6)
    [[ $help == *--window* ]] && extra+=(--window 8)
    [[ $help == *--max-prompts* ]] && extra+=(--max-prompts 4)
    [[ $help == *--max-new-tokens* ]] && extra+=(--max-new-tokens 16)
    [[ $help == *--n-pairs* ]] && extra+=(--n-pairs 3)
    [[ $help == *--from-sweep* ]] && extra+=(--from-sweep "$runs/ablate")
  fi
  run "$name" "$cmd" "${common[@]}" "${extra[@]}" "$@"
}

rm -rf "$runs" && mkdir -p "$runs"
probe contraction ablate ablate-group ablate-layer attn-vs-mlp heads saliency patch attribution \
  temporal kv-patch gain validate verify robustness subspace steer sae report
run contraction contraction "${common[@]}" --layers 1,6 --window 8
run ablate ablate "${common[@]}" --measure-layers 1,6 --window 8 --max-prompts 4
run ablate-kl ablate "${common[@]}" --measure-layers 1,6 --window 8 --max-prompts 4 --kl
run ablate-mean ablate "${common[@]}" --measure-layers 1,6 --window 8 --max-prompts 4 --mode mean --unit kv_group
run ablate-group ablate-group "${common[@]}" --from-sweep "$runs/ablate" --top-k 3 --n-random 3 --measure-layers 1,6 --window 8 --max-prompts 4
run ablate-layer ablate-layer "${common[@]}" --layers 0-5 --component both --measure-layers 1,6 --window 8 --max-prompts 4
run attn-vs-mlp attn-vs-mlp "${common[@]}" --window 8 --max-prompts 4
run heads heads "${common[@]}" --window 8 --max-prompts 4
run saliency saliency "${common[@]}" --measure-layers 1,6 --window 8 --max-prompts 4
run patch patch "${common[@]}" --heads 3.1,4.0 --measure-layers 1,6 --window 8 --max-prompts 4
run attribution attribution "${common[@]}" --from-sweep "$runs/ablate" --measure-layers 1,6 --window 8 --max-prompts 4
run temporal temporal "${common[@]}" --layers 1,6 --window 8 --max-new-tokens 16
run kv-patch kv-patch "${common[@]}" --layers 1,6 --window 8 --n-pairs 3 --max-new-tokens 16 --ranges '4-7;6'
run gain gain "${common[@]}"
run validate validate "${common[@]}" --n-pairs 3 --max-new-tokens 16
run ablate-modes ablate "${common[@]}" --measure-layers 1,6 --window 8 --max-prompts 4 --mode zero,mean,resample --n-resample 2
run ablate-compiled ablate "${common[@]}" --measure-layers 1,6 --window 8 --max-prompts 4 --compile
run verify verify "${common[@]}" --layers 1,6
run robustness robustness "${common[@]}" --max-prompts 6 --early-layers 1-2 --late-layers 5-6 --windows 8,12 --n-perm 200
run subspace subspace "${common[@]}" --layer 6 --window 8
run steer steer "${common[@]}" --layer 4 --layers 1,6 --window 8 --max-prompts 3 --alphas 0,2 --n-random 1 --max-new-tokens 16
run sae-train sae train "${common[@]}" --layer 4 --steps 200 --d-sae 256
run sae-features sae features "${common[@]}" --sae "$runs/sae-train/sae" --layer 4 --window 8 --max-prompts 6
# Commands added after this script (skipped cleanly until they exist; see run_new).
run_new contraction-nulls contraction --layers 1,6 --null random-init:2,token-shuffle:1
# report: reads finished runs (its --out only if it has one).
if [[ -n ${ONLY:-} && " $ONLY " != *" report "* ]]; then
  :
elif has report; then
  # the whole run store of this smoke run where it takes one, else the ablate run
  if [[ ${helps[report]} == *--runs* ]]; then report_args=(--runs "$runs"); else report_args=("$runs/ablate"); fi
  [[ ${helps[report]} == *--out* ]] && report_args+=(--out "$runs/report")
  started=$SECONDS
  if $rloop report "${report_args[@]}" >"$runs/report.log" 2>&1; then
    echo "ok    report ($((SECONDS - started)) s)"
  else
    echo "FAIL  report ($((SECONDS - started)) s): $(grep '[[:alnum:]]' "$runs/report.log" | tail -1)"
    failed=1
  fi
else
  echo "skip  report: rloop report not available"
fi
exit $failed
