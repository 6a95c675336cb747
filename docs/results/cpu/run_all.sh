#!/usr/bin/env bash
# The CPU measurements of docs/BENCHMARKS.md, one after another on an otherwise idle machine.
set -u
IMPLS="eager inductor inductor-again runlora frozen"
B="runlora-bench --no-progress"
$B --layer --in 1024 --tokens 4096 --rank 8 64 256 --impls $IMPLS --criterions flops roofline --plot -o runs/bench2/layer_1024 > runs/bench2/layer_1024.log 2>&1
$B --layer --in 512 --out-features 1536 --tokens 4096 --rank 16 --impls $IMPLS --criterions flops roofline --plot -o runs/bench2/layer_512x1536 > runs/bench2/layer_512x1536.log 2>&1
$B --layer --in 1024 --tokens 512 --rank 16 --impls $IMPLS --criterions flops roofline -o runs/bench2/layer_1024_n512 > runs/bench2/layer_1024_n512.log 2>&1
$B --layer --in 1024 --tokens 4096 --rank 16 128 -d 0.1 --impls $IMPLS --criterions flops -o runs/bench2/layer_1024_dropout > runs/bench2/layer_1024_dropout.log 2>&1
$B --layer --in 1024 --tokens 4096 --rank 16 --dtype bf16 --impls $IMPLS --criterions flops -o runs/bench2/layer_1024_bf16 > runs/bench2/layer_1024_bf16.log 2>&1
$B --layer --in 1024 --tokens 4096 --rank 16 --dtype bf16 --fp32-adapters --impls $IMPLS --criterions flops -o runs/bench2/layer_1024_bf16_fp32adapters > runs/bench2/layer_1024_bf16_fp32adapters.log 2>&1
$B -m llama_60m --n_batch 2 --seq_len 256 -r 16 --impls $IMPLS --criterions flops roofline --plot -o runs/bench2/llama_60m_r16 > runs/bench2/llama_60m_r16.log 2>&1
$B -m llama_60m --n_batch 2 --seq_len 256 -r 128 --impls $IMPLS --criterions flops --plot -o runs/bench2/llama_60m_r128 > runs/bench2/llama_60m_r128.log 2>&1
echo ALLDONE > runs/bench2/done
