#!/usr/bin/env bash
# The CPU measurements of docs/BENCHMARKS.md "QDoRA", one after another on an otherwise idle machine:
# PEFT DoRA on bitsandbytes 4-bit bases (nf4, double quantisation, quantized from random weights): eager
# PEFT, stock Inductor (twice: the A/A noise), runlora, stock Inductor and runlora on plain QLoRA of the
# same shapes (the price DoRA should cost) and the frozen 4-bit model, interleaved in one process per case.
set -u
OUT=${OUT:-runs/qdora}
mkdir -p "$OUT"
export RUNLORA_CACHE_DIR=${RUNLORA_CACHE_DIR:-$OUT/forms_cache}
BENCH=${BENCH:-.venv/bin/runlora-bench}
IMPLS=${IMPLS:-eager inductor inductor-again runlora inductor-lora runlora-lora frozen}
run() {  # name, then runlora-bench arguments
  local name=$1; shift
  $BENCH --no-progress --4bit --dora "$@" --impls $IMPLS -o "$OUT/$name" > "$OUT/$name.log" 2>&1
}
STAGES=${STAGES:-layers models recipe recipe_models}
if [[ " $STAGES " == *" layers "* ]]; then
run sq1024 --layer --in 1024 --tokens 4096 --rank 16 64
fi
if [[ " $STAGES " == *" models "* ]]; then
run llama_60m_r16 -m llama_60m --n_batch 8 --seq_len 512 -r 16
fi
if [[ " $STAGES " == *" recipe "* ]]; then   # bf16 compute dtype with PEFT's fp32 adapters (the QLoRA recipe's dtypes)
run sq1024_bf16 --layer --in 1024 --tokens 4096 --rank 16 --dtype bf16 --fp32-adapters
fi
if [[ " $STAGES " == *" recipe_models "* ]]; then   # the same dtypes on Llama-60m, without eager (11 minutes)
IMPLS="inductor inductor-again runlora inductor-lora runlora-lora frozen" \
run llama_60m_r16_bf16 -m llama_60m --n_batch 8 --seq_len 512 -r 16 --dtype bf16 --fp32-adapters
fi
