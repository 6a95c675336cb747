"""Layer mode: one PEFT LoRA linear (or a short stack of them, or siblings of one input) at chosen shapes.

    X[b, N/b, i] → Y = X·Wᵀ + s·(X·Aᵀ)·Bᵀ,    W[o,i], A[r,i], B[o,r], s = lora_alpha / r

X requires grad (a LoRA layer deep in a model receives an input that does), so every backward
computes dA, dB and dX. The loss is the fixed reduction Σ Y ⊙ G with a fixed random G[b, N/b, o]:
its gradient dY = G is an ordinary dense tensor, as it would arrive from the layers above, and it
keeps Y itself out of what autograd saves. A stack of k layers alternates i→o and o→i (an MLP's
up and down projection), with no activation in between.

Sizes accept lists and ranges: `1024`, `512 4096`, `256:4096` (doubling, inclusive), `8:64:8` (step
8), `16:1024:x4` (times 4).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn


def parse_sizes(values: Iterable[str]) -> list[int]:
    """Expand `512`, `256:4096` (×2), `8:64:8` (+8) and `16:1024:x4` (×4) into sorted distinct ints."""
    sizes: list[int] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            if ":" not in part:
                sizes.append(_positive_int(part))
                continue
            pieces = part.split(":")
            if len(pieces) not in (2, 3):
                raise ValueError(f"a range is START:STOP[:STEP], got {part!r}")
            start, stop = _positive_int(pieces[0]), _positive_int(pieces[1])
            step = pieces[2] if len(pieces) == 3 else "x2"
            if stop < start:
                raise ValueError(f"range {part!r} runs backwards")
            if step.startswith("x"):
                factor = int(step[1:])
                if factor < 2:
                    raise ValueError(f"a multiplicative step must be x2 or more, got {part!r}")
                size = start
                while size <= stop:
                    sizes.append(size)
                    size *= factor
            else:
                sizes.extend(range(start, stop + 1, _positive_int(step)))
    if not sizes:
        raise ValueError("no sizes given")
    return sorted(set(sizes))


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"sizes must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class LayerShape:
    """One case of layer mode: N tokens through `stack` LoRA linears i→o (→i→o …) of rank r."""

    i: int
    o: int
    tokens: int
    r: int
    batch: int
    stack: int = 1
    siblings: int = 1

    @property
    def label(self) -> str:
        stack = f" ×{self.stack}" if self.stack > 1 else ""
        siblings = f" {self.siblings} siblings" if self.siblings > 1 else ""
        return f"i={self.i} o={self.o} N={self.tokens} (b={self.batch}) r={self.r}{stack}{siblings}"

    @property
    def out_features(self) -> int:
        return self.siblings * (self.o if self.stack % 2 else self.i)


def layer_batch(tokens: int, requested: int | None) -> int:
    """The b of X[b, N/b, i]: the requested batch if it divides N, else gcd(N, 32)."""
    if requested is not None:
        if tokens % requested:
            raise ValueError(f"--n_batch {requested} does not divide --tokens {tokens}")
        return requested
    return math.gcd(tokens, 32)


def sibling_names(siblings: int) -> list[str]:
    """The LoRA targets of a block: `proj`, then `proj2`, `proj3`, … for its siblings."""
    return ["proj"] + [f"proj{k}" for k in range(2, siblings + 1)]


class LinearBlock(nn.Module):
    """One linear i→o, or `siblings` linears of the same input whose outputs are concatenated (as q/k/v
    read one hidden state and feed different paths): Y = [X·W₁ᵀ, X·W₂ᵀ, …]."""

    def __init__(self, i: int, o: int, bias: bool, siblings: int = 1):
        super().__init__()
        self.names = sibling_names(siblings)
        for name in self.names:
            self.add_module(name, nn.Linear(i, o, bias=bias))

    def forward(self, x):
        if len(self.names) == 1:
            return self.proj(x)
        return torch.cat([getattr(self, name)(x) for name in self.names], dim=-1)


class LinearStack(nn.Module):
    """`depth` linears alternating i→o and o→i (or one block of sibling linears); the LoRA targets are
    their `proj` (`proj2`, … for siblings)."""

    def __init__(self, i: int, o: int, depth: int, bias: bool, siblings: int = 1):
        super().__init__()
        if siblings > 1 and depth > 1:
            raise ValueError("--siblings and --stack cannot be combined")
        dims = [(i, o) if k % 2 == 0 else (o, i) for k in range(depth)]
        self.blocks = nn.ModuleList(LinearBlock(a, b, bias, siblings) for a, b in dims)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def build_layer_models(shape: LayerShape, *, r: int, alpha: float, dropout: float, bias: bool,
                       dtype: torch.dtype, device: torch.device, fp32_adapters: bool, seed: int = 0,
                       use_dora: bool = False, bits4: bool = False):
    """(peft_model, frozen_model): the same base stack, with and without LoRA on every `proj`."""
    from lora_rewrite.bench.models import add_lora

    torch.manual_seed(seed)
    with torch.device(device):
        base = LinearStack(shape.i, shape.o, shape.stack, bias, shape.siblings)
    base = base.to(dtype).train()
    if bits4:   # QLoRA: the bases quantized to 4-bit; the frozen floor is the same 4-bit stack
        from lora_rewrite.bench.models import quantize_4bit

        base = quantize_4bit(base, sibling_names(shape.siblings), dtype)
    frozen = copy.deepcopy(base).requires_grad_(False)
    peft_model = add_lora(base, r=r, alpha=alpha, dropout=dropout, target_modules=sibling_names(shape.siblings),
                          fp32_adapters=fp32_adapters, seed=seed, use_dora=use_dora)
    return peft_model, frozen


@dataclass
class LayerInputs:
    x: torch.Tensor         # X[b, N/b, i]
    probe: torch.Tensor     # G[b, N/b, o_last]: the loss is Σ Y ⊙ G, so dY = G

    def fresh_x(self) -> torch.Tensor:
        # a fresh leaf that requires grad, sharing X's storage (no copy inside the timed step)
        return self.x.detach().requires_grad_()


def make_layer_inputs(shape: LayerShape, *, dtype: torch.dtype, device: torch.device, seed: int = 0) -> LayerInputs:
    generator = torch.Generator().manual_seed(seed)
    seq = shape.tokens // shape.batch
    x = torch.randn(shape.batch, seq, shape.i, generator=generator).to(device=device, dtype=dtype)
    probe = torch.randn(shape.batch, seq, shape.out_features, generator=generator).to(device=device, dtype=dtype)
    return LayerInputs(x, probe)


class ProbeLoss(nn.Module):
    """Σ model(X) ⊙ G as one module, so the reduction is compiled together with the layers."""

    def __init__(self, model: nn.Module, probe: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("probe", probe, persistent=False)

    def forward(self, x):
        return (self.model(x) * self.probe).sum()


def layer_loss_step(loss_module, inputs: LayerInputs) -> Callable[[], torch.Tensor]:
    """The forward half of one step: `loss_module` (a ProbeLoss, maybe compiled) on a fresh leaf X."""
    def forward_loss():
        return loss_module(inputs.fresh_x())

    return forward_loss
