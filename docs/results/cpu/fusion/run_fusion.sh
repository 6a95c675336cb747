#!/usr/bin/env bash
# The sibling-fusion measurements of docs/BENCHMARKS.md: runlora with and without fuse_siblings, side by side
# with eager, stock Inductor (twice: the A/A noise) and the frozen floor. Run from the repository root on an
# otherwise idle machine.
set -u
mkdir -p runs/fuse
IMPLS="eager inductor inductor-again runlora-flops runlora-flops-unfused frozen"
B="runlora-bench --no-progress"
$B --layer --in 1024 --tokens 512 4096 --rank 16 128 --siblings 3 --impls $IMPLS -o runs/fuse/layer_1024_siblings3 > runs/fuse/layer_1024_siblings3.log 2>&1
$B --layer --in 1024 --tokens 512 --rank 16 --siblings 3 --impls $IMPLS -o runs/fuse/layer_1024_n512_siblings3 > runs/fuse/layer_1024_n512_siblings3.log 2>&1
$B -m llama_60m --n_batch 2 --seq_len 256 -r 16 --impls $IMPLS -o runs/fuse/llama_60m_r16 > runs/fuse/llama_60m_r16.log 2>&1
$B -m llama_60m --n_batch 2 --seq_len 256 -r 128 --impls $IMPLS -o runs/fuse/llama_60m_r128 > runs/fuse/llama_60m_r128.log 2>&1
