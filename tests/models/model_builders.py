"""Tiny Hugging Face models with PEFT LoRA on every attention and MLP linear, built from configs with
random weights (no download), and the measurements the model tests share.

Each family is a config small enough to compile in seconds on a CPU (hidden 32, 1–2 layers, vocab 128)
and the `target_modules` that put an adapter on each of its attention and MLP projections:

    llama, mistral, qwen2   q_proj k_proj v_proj o_proj gate_proj up_proj down_proj   (mistral, qwen2: GQA)
    opt                     q_proj k_proj v_proj out_proj fc1 fc2
    gpt2                    c_attn c_proj c_fc        (transformers' Conv1D: W stored [i,o])
    roberta, bert           query key value dense     (the encoder's; not the LM head's dense)

The models' own dropouts are 0 so eager and compiled runs see the same values; the tests about dropout
turn on PEFT's `lora_dropout` only.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
import torch.nn as nn

VOCAB = 128
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENCODER_MODULES = r".*encoder\.layer\.\d+\..*\.(query|key|value|dense)"


def _llama(layers: int):
    import transformers as tf

    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64))


def _mistral(layers: int):
    import transformers as tf

    return tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def _qwen2(layers: int):
    import transformers as tf

    return tf.Qwen2ForCausalLM(tf.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def _opt(layers: int):
    import transformers as tf

    return tf.OPTForCausalLM(tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, layerdrop=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2))


def _gpt2(layers: int):
    import transformers as tf

    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    # GPT2LMHeadModel's class name does not select a loss by itself: transformers then logs a warning from
    # inside forward, which is a graph break for every backend. Naming the loss keeps the graph whole.
    config.loss_type = "ForCausalLM"
    return tf.GPT2LMHeadModel(config)


def _roberta(layers: int):
    import transformers as tf

    return tf.RobertaForMaskedLM(tf.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _bert(layers: int):
    import transformers as tf

    return tf.BertForMaskedLM(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


FAMILIES: dict[str, tuple[Callable, object]] = {
    "llama": (_llama, LLAMA_MODULES),
    "mistral": (_mistral, LLAMA_MODULES),
    "qwen2": (_qwen2, LLAMA_MODULES),
    "opt": (_opt, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    "gpt2": (_gpt2, ["c_attn", "c_proj", "c_fc"]),
    "roberta": (_roberta, ENCODER_MODULES),
    "bert": (_bert, ENCODER_MODULES),
}


def base_model(family: str, *, layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family][0](layers)


def peft_model(family: str, *, layers: int = 2, r: int = 4, alpha: float = 8, dtype: torch.dtype | None = None,
               autocast_adapter_dtype: bool = True, seed: int = 0, **lora_config):
    """get_peft_model on a tiny `family` model, with LoRA on every attention and MLP linear and B ≠ 0
    (PEFT's B = 0 start would make every dA zero and hide a wrong one).

    dtype: the base model's dtype, set before get_peft_model as a user would; PEFT then keeps the
    adapters in fp32 unless autocast_adapter_dtype=False, in which case they are cast to dtype too."""
    from peft import LoraConfig, get_peft_model

    model = base_model(family, layers=layers, seed=seed)
    if dtype is not None:
        model = model.to(dtype)
    lora_config.setdefault("target_modules", FAMILIES[family][1])
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, **lora_config),
                          autocast_adapter_dtype=autocast_adapter_dtype)
    randomize_lora_b(peft, seed=seed)
    if dtype is not None and not autocast_adapter_dtype:
        peft = peft.to(dtype)
    return peft


def randomize_lora_b(model: nn.Module, std: float = 0.1, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def batch(*, size: int = 2, seq: int = 12, seed: int = 0) -> dict:
    """Token ids and their own labels: a causal-LM or a masked-LM loss, whichever the model computes."""
    ids = torch.randint(0, VOCAB, (size, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def batches(n: int, **kwargs) -> list[dict]:
    return [batch(seed=k, **kwargs) for k in range(n)]


# --- what a step runs through --------------------------------------------------------------------------

def lora_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every PEFT LoRA Linear of the model with an active adapter, by module name."""
    from peft.tuners.lora.layer import Linear

    return {name: m for name, m in model.named_modules()
            if isinstance(m, Linear) and any(a in m.lora_A for a in m.active_adapters)}


@contextlib.contextmanager
def executed_lora_linears(model: nn.Module):
    """The names of the LoRA Linears (with an active adapter) that run inside the block, in eager."""
    ran: list[str] = []
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: ran.append(name))
               for name, m in lora_linears(model).items()]
    try:
        yield ran
    finally:
        for h in handles:
            h.remove()


def site_owner(site_module: str, lora_names) -> str:
    """The LoRA module a report's site belongs to. A report names modules relative to the compiled
    frame, so it is a dotted suffix of exactly one of the model's module names."""
    owners = [n for n in lora_names if n == site_module or n.endswith("." + site_module)]
    assert len(owners) == 1, f"site {site_module!r} matches {owners} among the model's LoRA linears"
    return owners[0]


# --- steps -------------------------------------------------------------------------------------------

def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("_orig_mod."): p for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(fn, model: nn.Module, inputs: dict):
    """One forward + backward of `fn` (the model, or a compiled model) on `inputs`: the loss and the
    gradient of every trainable parameter of `model`."""
    model.zero_grad(set_to_none=True)
    loss = fn(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in trainable(model).items() if p.grad is not None}


def train(fn, model: nn.Module, data: list[dict], *, lr: float = 1e-3, optimizer=None,
          first_grads: dict | None = None):
    """AdamW steps of `fn` over `data`: per-step losses (float64) and the final trainable parameters.
    `first_grads`, a dict, receives the first step's gradient of every trainable parameter: AdamW's update
    does not change when every gradient is scaled alike, so a parity of losses and weights alone cannot see
    a gradient off by a constant factor."""
    opt = optimizer or torch.optim.AdamW(list(trainable(model).values()), lr=lr)
    losses = []
    for k, inputs in enumerate(data):
        opt.zero_grad(set_to_none=True)
        loss = fn(**inputs).loss
        loss.backward()
        if k == 0 and first_grads is not None:
            first_grads.update({n: p.grad.detach().clone() for n, p in trainable(model).items()})
        opt.step()
        losses.append(loss.detach().double())
    return torch.stack(losses), {n: p.detach().clone() for n, p in trainable(model).items()}


def rel_err(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """‖actual − reference‖∞ / ‖reference‖∞, in float64."""
    reference, actual = reference.detach().double(), actual.detach().double()
    return float((actual - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def max_rel_err(reference: dict, actual: dict) -> float:
    assert reference.keys() == actual.keys()
    return max(rel_err(reference[k], actual[k]) for k in reference)


def twins(model: nn.Module, n: int = 2) -> list[nn.Module]:
    """Independent copies with the same state: one for eager PEFT, one (or more) to compile."""
    return [copy.deepcopy(model) for _ in range(n)]


def runlora(model: nn.Module, **options):
    return torch.compile(model, backend="runlora", options={"codegen": False, **options})


def stock(model: nn.Module, **options):
    """Stock Inductor's pipeline (decompositions, joint passes, partitioner), without code generation."""
    return torch.compile(model, backend="runlora", options={"codegen": False, "rewrite": False, **options})


def dynamo_counts() -> dict:
    """What Dynamo compiled: graphs (recompiles included) and graph breaks. (Not the frame counts: the
    first compiled call in a process can visit more frames, e.g. a transformers warning_once that logs
    only the first time.)"""
    c = torch._dynamo.utils.counters
    return {"unique_graphs": c["stats"]["unique_graphs"], "graph_breaks": sum(c["graph_break"].values())}


class Autocast(nn.Module):
    """Runs the wrapped model under torch.autocast(cpu, bfloat16), as a training script would."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, **kwargs):
        with torch.autocast("cpu", dtype=self.dtype):
            return self.inner(**kwargs)
