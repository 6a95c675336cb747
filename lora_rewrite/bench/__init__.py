"""runlora-bench: the RunLoRA paper's forward+backward benchmark, measured as the project's protocol asks.

    runlora-bench -m llama_60m --n_batch 10 -r 8 --dtype bf16          # a model from a shipped config
    runlora-bench --layer --in 1024 --out-features 1024 4096 --tokens 512 4096 --rank 8 64

Compares, in one process and interleaved round-robin: `eager` (PEFT), `inductor` (stock
torch.compile), `runlora-<criterion>` and `frozen` (the base model without adapters: the floor).
Modules: `models` (configs → random-weight transformers models, PEFT adapters, inputs), `layer`
(single LoRA linears X[N,i], W[o,i], A[r,i], B[o,r]), `measure` (timing, memory, machine),
`report` (table, CSV, JSON), `plots` (speedup bars, variant maps), `__main__` (the command line).
"""
