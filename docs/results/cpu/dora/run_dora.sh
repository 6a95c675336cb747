#!/usr/bin/env bash
# The CPU measurements of docs/BENCHMARKS.md "DoRA" (issue 17), one after another on an otherwise idle
# machine: per case, in one process, interleaved: eager PEFT DoRA, stock Inductor on DoRA as users get it
# without lora_rewrite's stand-in (inductor-breaks: a graph break per DoRA layer) and with it (inductor: one
# graph), runlora on DoRA, stock Inductor and runlora on plain LoRA of the same shapes, stock Inductor
# again (the A/A noise), and the frozen floor. The case's notes say whether each DoRA target was met.
set -u
OUT=${OUT:-runs/dora}
mkdir -p "$OUT"
export RUNLORA_CACHE_DIR=${RUNLORA_CACHE_DIR:-$OUT/forms_cache}
BENCH=${BENCH:-.venv/bin/runlora-bench}
IMPLS="eager inductor-breaks inductor inductor-again runlora inductor-lora runlora-lora frozen"
run() {  # name, then runlora-bench arguments
  local name=$1; shift
  $BENCH --no-progress --dora "$@" --impls $IMPLS -o "$OUT/$name" > "$OUT/$name.log" 2>&1
}
STAGES=${STAGES:-layers models}
if [[ " $STAGES " == *" layers "* ]]; then
run sq1024 --layer --in 1024 --tokens 4096 --rank 16 64
run mlp_up --layer --in 1024 --out-features 2816 --tokens 4096 --rank 16 64
run mlp_down --layer --in 2816 --out-features 1024 --tokens 4096 --rank 16 64
fi
if [[ " $STAGES " == *" models "* ]]; then
run llama_60m_r16 -m llama_60m --n_batch 8 --seq_len 512 -r 16
run llama_130m_r16 -m llama_130m --n_batch 8 --seq_len 512 -r 16
fi
if [[ " $STAGES " == *" mixed "* ]]; then   # PEFT's default on a bf16 model: fp32 adapters and magnitude
# without eager and inductor-breaks (all eight did not finish in 10 minutes), 31 rounds (bf16's A/A is wide)
$BENCH --no-progress --dora --layer --in 1024 --tokens 4096 --rank 16 --dtype bf16 --fp32-adapters --rounds 31 \
  --impls inductor inductor-again runlora inductor-lora runlora-lora frozen \
  -o "$OUT/sq1024_bf16_fp32adapters" > "$OUT/sq1024_bf16_fp32adapters.log" 2>&1
fi
