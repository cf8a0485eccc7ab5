#!/usr/bin/env bash
# Run every rloop experiment once on a CUDA device with a small model directory, bf16, and
# report each command's exit status (the CPU test suite cannot reach the CUDA code paths).
#   scripts/gpu_smoke.sh MODEL_DIR [RUNS_DIR]
# MODEL_DIR: any supported model saved with save_pretrained (weights + tokenizer); a random
# 8-layer Llama with the embedded model's tokenizer is enough. Exits non-zero if any failed.
# DEVICE=cpu DTYPE=float32 runs the same list on the CPU. Making such a directory (18 MB):
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
run() {
  local name=$1; shift
  local started=$SECONDS
  if $rloop "$@" --out "$runs/$name" >"$runs/$name.log" 2>&1; then
    echo "ok    $name ($((SECONDS - started)) s)"
  else
    echo "FAIL  $name: $(grep -v '^\s*$' "$runs/$name.log" | tail -1)"
    failed=1
  fi
}
rm -rf "$runs" && mkdir -p "$runs"
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
exit $failed
