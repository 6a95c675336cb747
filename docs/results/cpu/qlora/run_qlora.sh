#!/usr/bin/env bash
# The CPU measurements of docs/BENCHMARKS.md "QLoRA" (issue 20), one after another on an otherwise idle
# machine: PEFT LoRA on bitsandbytes 4-bit bases (nf4, double quantisation, quantized from random
# weights): eager PEFT QLoRA, stock Inductor (twice: the A/A noise), runlora and the frozen 4-bit model,
# interleaved in one process per case.
set -u
OUT=${OUT:-runs/qlora}
mkdir -p "$OUT"
export RUNLORA_CACHE_DIR=${RUNLORA_CACHE_DIR:-$OUT/forms_cache}
BENCH=${BENCH:-.venv/bin/runlora-bench}
IMPLS="eager inductor inductor-again runlora frozen"
run() {  # name, then runlora-bench arguments
  local name=$1; shift
  $BENCH --no-progress --4bit "$@" --impls $IMPLS -o "$OUT/$name" > "$OUT/$name.log" 2>&1
}
STAGES=${STAGES:-layers models}
if [[ " $STAGES " == *" layers "* ]]; then
run sq1024 --layer --in 1024 --tokens 4096 --rank 16 64 --stack 2
run mlp_up --layer --in 1024 --out-features 2816 --tokens 4096 --rank 16 64 --stack 2
fi
if [[ " $STAGES " == *" models "* ]]; then
run llama_60m_r16 -m llama_60m --n_batch 8 --seq_len 512 -r 16
fi
