#!/usr/bin/env bash
# The CPU measurements of docs/BENCHMARKS.md "Lowering: product forms" (issue 11), one after another on
# an otherwise idle machine. AFTER: this checkout's runlora-bench; BEFORE: a checkout of the commit
# before the forms (232eb2c) with its own .venv, given as $BEFORE_BENCH.
set -u
OUT=${OUT:-runs/lowering}
mkdir -p "$OUT"
# The measured forms start cold: each shape is measured in its first case's first compile.
export RUNLORA_CACHE_DIR=${RUNLORA_CACHE_DIR:-$OUT/forms_cache}
AFTER_BENCH=${AFTER_BENCH:-.venv/bin/runlora-bench}
BEFORE_BENCH=${BEFORE_BENCH:-}
AFTER_IMPLS="frozen inductor inductor-again runlora-flops runlora-flops-direct"
BEFORE_IMPLS="frozen inductor inductor-again runlora-flops"
layer() {  # name, then runlora-bench layer arguments
  local name=$1; shift
  $AFTER_BENCH --no-progress --layer "$@" --impls $AFTER_IMPLS ${EXTRA_IMPLS:-} -o "$OUT/after_$name" > "$OUT/after_$name.log" 2>&1
  if [ -n "$BEFORE_BENCH" ]; then
    $BEFORE_BENCH --no-progress --layer "$@" --impls $BEFORE_IMPLS -o "$OUT/before_$name" > "$OUT/before_$name.log" 2>&1
  fi
}
STAGES=${STAGES:-layers dropout compile models models_more models_bf16}
if [[ " $STAGES " == *" layers "* ]]; then
EXTRA_IMPLS="runlora-time" layer sq1024_n4096 --in 1024 --tokens 4096 --rank 8 16 64 256
layer sq1024_n1024_8192 --in 1024 --tokens 1024 8192 --rank 16
layer mlp_up_n4096 --in 1024 --out-features 2816 --tokens 4096 --rank 16 64
layer mlp_down_n4096 --in 2816 --out-features 1024 --tokens 4096 --rank 16 64
# bf16 cases: only where the CPU has bf16 matmuls (avx512_bf16 / AMX). On the AVX2-only machine of
# 2026-11-24 one bf16 [4096,1024]·[1024,1024] product took 9 s, so they were not run there.
if grep -q "avx512_bf16\|amx_bf16" /proc/cpuinfo; then
  layer sq1024_bf16 --in 1024 --tokens 4096 --rank 16 64 --dtype bf16
  layer sq1024_bf16_fp32adapters --in 1024 --tokens 4096 --rank 16 --dtype bf16 --fp32-adapters
fi
echo LAYERS_DONE > "$OUT/layers_done"
fi
if [[ " $STAGES " == *" dropout "* ]]; then
layer sq1024_dropout --in 1024 --tokens 4096 --rank 16 -d 0.1
fi
if [[ " $STAGES " == *" compile "* ]]; then
# Compile time, measured-forms cache cold and then warm: the same case twice on a fresh cache folder.
COLD=$(mktemp -d)
for run in cold warm; do
  RUNLORA_CACHE_DIR=$COLD $AFTER_BENCH --no-progress --layer --in 1024 --tokens 4096 --rank 16 \
    --impls frozen inductor runlora-flops -o "$OUT/compile_$run" > "$OUT/compile_$run.log" 2>&1
done
fi
model() {  # name, then runlora-bench model arguments (frozen, inductor twice and runlora-flops: a model step is long)
  local name=$1; shift
  $AFTER_BENCH --no-progress "$@" --impls $BEFORE_IMPLS -o "$OUT/after_$name" > "$OUT/after_$name.log" 2>&1
  if [ -n "$BEFORE_BENCH" ]; then
    $BEFORE_BENCH --no-progress "$@" --impls $BEFORE_IMPLS -o "$OUT/before_$name" > "$OUT/before_$name.log" 2>&1
  fi
}
if [[ " $STAGES " == *" models "* ]]; then
model llama_60m_r16 -m llama_60m --n_batch 8 --seq_len 512 -r 16
model llama_60m_r128 -m llama_60m --n_batch 8 --seq_len 512 -r 128
fi
# The rest of the model matrix (after only: the before checkout was not run for these).
if [[ " $STAGES " == *" models_more "* ]]; then
BEFORE_BENCH= model llama_130m_r16 -m llama_130m --n_batch 8 --seq_len 512 -r 16
BEFORE_BENCH= model opt_125m_r16 -m opt_125m --n_batch 8 --seq_len 512 -r 16
BEFORE_BENCH= model llama_130m_r128 -m llama_130m --n_batch 8 --seq_len 512 -r 128
fi
# PEFT's default on a 16-bit model: fp32 adapters on a bf16 base (merging illegal). bf16 CPUs only.
if [[ " $STAGES " == *" models_bf16 "* ]] && grep -q "avx512_bf16\|amx_bf16" /proc/cpuinfo; then
model llama_60m_bf16_fp32adapters_r16 -m llama_60m --n_batch 8 --seq_len 512 -r 16 --dtype bf16 --fp32-adapters
model llama_130m_bf16_fp32adapters_r16 -m llama_130m --n_batch 8 --seq_len 512 -r 16 --dtype bf16 --fp32-adapters
fi
echo ALL_DONE > "$OUT/all_done"
