"""Model mode: whole transformers models built from configs with random weights (never downloaded).

Shipped configs (`configs/*.json`, by name: `llama_60m`, `opt_125m`, `roberta_base`, …) are the
paper's: the ReLoRA LLaMA configs the RunLoRA repository uses (60m, 130m, 250m, 350m, 1.3b), the
standard facebook/opt-125m/-350m/-1.3b and roberta-base/-large configs. Each file keeps where it comes
from under the key "runlora_bench" (with the head to build), which is removed before the config is
handed to transformers. `tiny-llama`, `tiny-opt` and `tiny-roberta` are CPU-sized members of the same
families for smoke tests.

A step is `model(input_ids=…, labels=…).loss.backward()`, with the adapters on every attention and MLP
linear. The `frozen` floor is the same base model without adapters: nothing in it is trainable, so its
backward would be empty; it is fed `inputs_embeds` (the embedding lookup of the same tokens, done once
outside the timed step) as a fresh leaf that requires grad, so its backward is the base model's
input-gradient backward that every LoRA step also runs — and a little more: the input gradient of the first
layer's attention products and input norm, which a LoRA step (frozen embeddings) skips. A LoRA step can
therefore run slightly under the floor; every implementation is measured against the same one.
"""

from __future__ import annotations

import contextlib

import copy
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch

CONFIG_PACKAGE = "lora_rewrite.bench"
BENCH_KEY = "runlora_bench"

# Every attention and MLP linear of each family, as the paper adapts them.
TARGET_MODULES: dict[str, Any] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    # RoBERTa calls both the attention output and the MLP linears "dense", and so is the LM head's
    # transform: a regex keeps the adapters inside the encoder.
    "roberta": r".*encoder\.layer\.\d+\..*(query|key|value|dense)$",
}
# Families whose position embeddings are a learned table: no sequence longer than the table. (Llama's
# rotary positions have no such limit: the paper's Tables 2-3 use 2048 tokens with 1024-position configs.)
LEARNED_POSITIONS = frozenset({"opt", "roberta", "bert", "gpt2"})
DEFAULT_HEAD = {"llama": "causal-lm", "opt": "causal-lm", "roberta": "masked-lm"}
HEADS = ("causal-lm", "masked-lm")

TINY_CONFIGS: dict[str, dict] = {
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=172, num_attention_heads=4,
                       num_hidden_layers=2, vocab_size=512, max_position_embeddings=64, use_cache=False),
    "tiny-opt": dict(model_type="opt", hidden_size=64, ffn_dim=256, num_attention_heads=4, num_hidden_layers=2,
                     vocab_size=512, max_position_embeddings=64, word_embed_proj_dim=64, use_cache=False),
    "tiny-roberta": dict(model_type="roberta", hidden_size=64, intermediate_size=256, num_attention_heads=4,
                         num_hidden_layers=2, vocab_size=512, max_position_embeddings=66, type_vocab_size=1,
                         use_cache=False),
}


@dataclass
class ModelSpec:
    """A config ready to build, with where it came from."""

    name: str
    config: Any                # a transformers PretrainedConfig
    family: str                # "llama", "opt", "roberta", …
    head: str                  # "causal-lm" or "masked-lm"
    source: str

    @property
    def max_tokens_per_sequence(self) -> int:
        positions = getattr(self.config, "max_position_embeddings", None) or 512
        if self.family == "roberta":
            # RoBERTa's positions start after the padding index: 514 positions hold 512 tokens.
            positions -= (self.config.pad_token_id or 0) + 1
        return int(positions)


def shipped_config_names() -> list[str]:
    folder = resources.files(CONFIG_PACKAGE).joinpath("configs")
    return sorted(p.name[:-len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def _normalise(name: str) -> str:
    """`llama-60m`, `facebook/opt-125m`, `roberta-base` → the shipped file name."""
    return name.split("/")[-1].lower().replace("-", "_")


def load_spec(model_name_or_config: str, head: str | None = None) -> ModelSpec:
    """A shipped name, a tiny family name (`tiny-llama`) or a path to a config JSON."""
    from transformers import AutoConfig

    if model_name_or_config in TINY_CONFIGS:
        kwargs = dict(TINY_CONFIGS[model_name_or_config])
        model_type = kwargs.pop("model_type")
        config = AutoConfig.for_model(model_type, **kwargs)
        family = model_type
        return ModelSpec(model_name_or_config, config, family, head or DEFAULT_HEAD.get(family, "causal-lm"),
                         "tiny config for smoke tests (lora_rewrite.bench.models.TINY_CONFIGS)")
    path = Path(model_name_or_config)
    if path.suffix == ".json" and path.is_file():
        raw = json.loads(path.read_text())
        name = path.stem
    else:
        name = _normalise(model_name_or_config)
        if name not in shipped_config_names():
            raise ValueError(f"unknown model {model_name_or_config!r}: give a config JSON path, one of the shipped "
                             f"configs {shipped_config_names()} or one of {sorted(TINY_CONFIGS)}")
        raw = json.loads(resources.files(CONFIG_PACKAGE).joinpath("configs", f"{name}.json").read_text())
    meta = raw.pop(BENCH_KEY, {})
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(model_type, **raw)
    config.use_cache = False  # training: no key/value cache in the graph
    head = head or meta.get("head") or DEFAULT_HEAD.get(model_type, "causal-lm")
    return ModelSpec(name, config, model_type, head, meta.get("source", str(path)))


def build_base_model(spec: ModelSpec, *, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The transformers model of `spec`, randomly initialised (seeded), in training mode."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    if spec.head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {spec.head!r}")
    auto = AutoModelForCausalLM if spec.head == "causal-lm" else AutoModelForMaskedLM
    config = copy.deepcopy(spec.config)
    if spec.family == "roberta" and spec.head == "causal-lm":
        config.is_decoder = True
    torch.manual_seed(seed)
    with torch.device(device):
        model = auto.from_config(config)
    return model.to(dtype).train()


def default_target_modules(family: str):
    if family not in TARGET_MODULES:
        raise ValueError(f"no default target modules for family {family!r}: pass --target_modules")
    return TARGET_MODULES[family]


def add_lora(base_model, *, r: int, alpha: float, dropout: float, target_modules, fp32_adapters: bool,
             seed: int = 0, use_dora: bool = False):
    """PEFT LoRA on `target_modules`. Adapters live in the model's dtype (the paper's setting) unless
    `fp32_adapters` (PEFT's own default for bf16 models: adapters upcast to fp32, which makes the
    merged variants illegal). lora_B gets small random values so no product multiplies zeros."""
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, (list, tuple)) and len(target_modules) == 1 and \
            re.search(r"[\\.*$^(|]", target_modules[0]):
        target_modules = target_modules[0]   # one pattern: PEFT matches a string as a full regex
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none",
                        use_dora=use_dora)
    model = get_peft_model(base_model, config, autocast_adapter_dtype=fp32_adapters)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=generator) * 1e-3).to(p.dtype))
    return model.train()


def adapted_linears(peft_model) -> list:
    """PEFT's adapted linears in model order: lora.Linear (transformers' Conv1D bases included) and its
    bitsandbytes layers (LoraLayers, not lora.Linear)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    return [m for m in peft_model.modules() if isinstance(m, LoraLinear)
            or isinstance(m, LoraLayer) and hasattr(m.get_base_layer(), "in_features")]


def lora_layer_shapes(peft_model) -> list[tuple[int, int]]:
    """The distinct (i, o) of the adapted linears, in model order."""
    shapes: list[tuple[int, int]] = []
    for module in adapted_linears(peft_model):
        shape = (module.in_features, module.out_features)
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def count_lora_sites(peft_model) -> int:
    """The adapted linears: PEFT's lora.Linear and its bitsandbytes layers."""
    return len(adapted_linears(peft_model))


@dataclass
class ModelInputs:
    """Token ids (and labels) for the LoRA models; detached input embeddings for the frozen floor."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    frozen_embeds: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def lora_step_kwargs(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels}

    def frozen_step_kwargs(self) -> dict:
        # detach(): a fresh leaf every step, sharing the storage (no copy inside the timed step)
        return {"inputs_embeds": self.frozen_embeds.detach().requires_grad_(), "labels": self.labels}


def make_model_inputs(spec: ModelSpec, batch: int, seq_len: int, device: torch.device, *, seed: int = 0,
                      frozen_model=None) -> ModelInputs:
    vocab = spec.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    # ids from 4 up: no padding / special token, so every position is an ordinary token in every family
    input_ids = torch.randint(4, vocab, (batch, seq_len), generator=generator).to(device)
    inputs = ModelInputs(input_ids=input_ids, labels=input_ids.clone())
    if frozen_model is not None:
        with torch.no_grad():
            inputs.frozen_embeds = frozen_model.get_input_embeddings()(input_ids).detach()
    return inputs


def model_loss_step(model, kwargs_fn: Callable[[], dict]) -> Callable[[], torch.Tensor]:
    """The forward half of one step: a fresh batch of kwargs, `model(**kwargs).loss`."""
    def forward_loss():
        return model(**kwargs_fn()).loss

    return forward_loss


@contextlib.contextmanager
def dora_graph_breaks():
    """DoRA layers traced as they were before lora_rewrite's stand-in (lora_rewrite/traceable_peft.py):
    PEFT's own `dequantize_module_weight` under another identity, which Dynamo has no stand-in for, so
    every DoRA layer breaks the graph at its torchao test, as for a user today. Active only inside the
    block (the benchmark's `inductor-breaks` steps); compiled code guards on the function it saw, so the
    other implementations keep theirs."""
    from peft.tuners.lora import dora

    from lora_rewrite.traceable_peft import untraced_copy

    original = dora.dequantize_module_weight
    dora.dequantize_module_weight = untraced_copy(original)
    try:
        yield
    finally:
        dora.dequantize_module_weight = original


def enable_gradient_checkpointing(model) -> None:
    """transformers' gradient checkpointing, non-reentrant (its default), on a model or a PEFT model."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def with_dora_graph_breaks(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def forward_loss():
        with dora_graph_breaks():
            return step()

    return forward_loss


def lora_out_features(peft_model) -> list[int]:
    """The out-features of every adapted linear, plain or 4-bit, in model order (one per DoRA site)."""
    return [m.out_features for m in adapted_linears(peft_model)]


def lora_adapter_ranks(peft_model) -> list[tuple[int, int]]:
    """(r, element size of X·Aᵀ) of every adapted layer's active adapter, in model order — plain and
    quantized bases alike (PEFT's bnb layers are LoraLayers, not lora.Linear)."""
    from peft.tuners.lora import LoraLayer

    sites = []
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name in module.active_adapters:
                if name in module.lora_A:
                    sites.append((module.r[name], module.lora_A[name].weight.element_size()))
    return sites


def quantize_4bit(model, target_names, compute_dtype: torch.dtype):
    """Replace every nn.Linear named in `target_names` by bitsandbytes' 4-bit layer (nf4, double
    quantisation) holding its weight, quantized now (random weights, no download): the QLoRA base PEFT
    then wraps in `lora.bnb.Linear4bit`. Sets the model's `is_loaded_in_4bit`, which PEFT reads."""
    import bitsandbytes as bnb

    names = set(target_names)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name in names:
                setattr(parent, child_name, _linear_4bit(bnb, child, compute_dtype))
    model.is_loaded_in_4bit = True
    return model


def _linear_4bit(bnb, linear, compute_dtype):
    device = linear.weight.device
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(linear.weight.data.detach().cpu().clone(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.clone().to(compute_dtype), requires_grad=False)
    layer = layer.to(device)
    with torch.no_grad():   # the CPU backend quantizes on first use
        layer(torch.zeros(1, linear.in_features, dtype=compute_dtype, device=device))
    return layer
