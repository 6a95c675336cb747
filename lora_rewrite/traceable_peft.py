"""Traceable stand-ins for the library calls that break the graph around PEFT's layers: PEFT's own, which break
every DoRA layer's graph, and Hugging Face kernels', which under gradient checkpointing kept every checkpointed
layer of a transformers ≥ 5.25 model out of the graph (below).

`DoraLinearLayer.forward` (peft/tuners/lora/dora.py) calls `dequantize_module_weight`
(peft/utils/integrations.py) every step. For a plain weight that function returns the weight, but on
the way it tests `type(module.weight).__module__.startswith("torchao.")`, which Dynamo cannot trace on
torch 2.13 and 2.14 (2.11 and 2.15 trace it): each DoRA layer breaks the graph there (a 4-layer tiny
Llama with DoRA on its 7 linears: 41 breaks, 33 graphs; Llama-60m reaches Dynamo's recompile limit). Without one graph there is no DoRA site to rewrite. On a
model with transformers' Conv1D (GPT-2) a second PEFT function, `transpose`, breaks it too (below).

`install()` registers, through the public `torch.compiler.substitute_in_graph`, a stand-in that Dynamo
traces in its place: for the weights it can tell apart without that test — an `nn.Parameter` of exactly
that class on a module without HQQ's `W_q` (PEFT returns it as it is), or a plain `torch.Tensor` (FSDP's
unsharded views: PEFT returns it as it is) — it returns the weight; for a bitsandbytes 4-bit weight
(QDoRA) it dequantizes it as PEFT does (`dequantized_4bit_weight`: PEFT's class-name test and its CPU
re-wrap of the weight are two more graph breaks); for anything else (HQQ, torchao, bitsandbytes'
Int8Params, any other subclass) it calls PEFT's own function, exactly as before (with its graph break).
Outside Dynamo the original runs: the stand-in only changes tracing.

It is installed when the runlora backend is loaded (`import lora_rewrite`, which Dynamo's entry point
does on `backend="runlora"`): at once if peft is imported already, else right after peft imports
`peft.utils.integrations`. Once installed it applies to every torch.compile in the process, stock
Inductor's too (which then also traces DoRA layers as one graph).

Under gradient checkpointing a third PEFT call stops Dynamo: `DoraLinearLayer._cache_clear`, which
PEFT's cache decorator runs on every training forward, empties a dict — a mutation Dynamo refuses inside
a checkpointed region, so every checkpointed DoRA layer ran eagerly, for every backend. A method of an
nn.Module is inlined by Dynamo without consulting `substitute_in_graph`, so this one stand-in is set on
PEFT's class itself (`METHOD_STAND_INS`); outside torch.compile it calls PEFT's method, exactly as before.

transformers 5.25 depends on Hugging Face `kernels` (0.19), whose `use_kernelized_func` wraps the forward of
layers such as Llama's attention (`apply_rotary_pos_emb`): each call sets, then resets, a module-level
`CompileableContextVar` (kernels/_internals/layer/layer.py) naming the model's kernel functions. Under
torch.compile that is a mutation of a global object, which Dynamo refuses inside a checkpointed region
("Mutating a variable from outside the scope of this HOP"): every checkpointed decoder layer ran eagerly, for
every backend, and runlora found no site. Where every function it names runs its default forward (no hub
kernel was selected by `kernelize()`), reading the variable or not makes no difference to what runs: the
function falls back to the original either way. There the stand-ins of its `set` and `reset` (set on kernels'
class, as for PEFT's method) record nothing while Dynamo traces; a hub kernel selected, or any call outside
torch.compile, goes to kernels' own methods.
"""

from __future__ import annotations

import sys

import torch

_installed: list = []   # PEFT's functions the stand-ins were registered for


def plain_weight(module: torch.nn.Module):
    """The module's weight when PEFT's `dequantize_module_weight` would return it unchanged and that
    can be decided without its torchao test; None when only PEFT's function can say."""
    if hasattr(module, "W_q"):   # HQQ: dequantised by the module
        return None
    weight = module.weight
    if type(weight) is torch.nn.Parameter or type(weight) is torch.Tensor:
        return weight
    return None


def bnb_4bit_class():
    """bitsandbytes' Params4bit, or None where bitsandbytes is not imported (then no weight is one)."""
    bnb = sys.modules.get("bitsandbytes")
    return getattr(getattr(bnb, "nn", None), "Params4bit", None)


def dequantized_4bit_weight(module: torch.nn.Module):
    """A bitsandbytes 4-bit weight dequantized as PEFT's function does it —
    `bnb.functional.dequantize_4bit(weight.data, weight.quant_state)` — or None for any other weight.
    PEFT's function reaches that line through a test of the weight's class name, which Dynamo breaks the
    graph at (a tensor subclass's `__class__`), and on a CPU it then sets `module.weight` to
    `module.weight.to("cpu")`: a new Params4bit around the same data and quant state, which Dynamo also
    breaks at (a `.data` mutation). That re-wrap changes no value and is not repeated here."""
    params4bit = bnb_4bit_class()
    weight = module.weight
    if params4bit is None or type(weight) is not params4bit or hasattr(module, "W_q"):
        return None
    return sys.modules["bitsandbytes"].functional.dequantize_4bit(weight.data, weight.quant_state)


def make_stand_in(original):
    """The traceable stand-in for PEFT's `original` dequantize_module_weight. Anything but a plain or a
    bitsandbytes 4-bit weight goes to PEFT's code as it is — through a copy of the function: Dynamo would
    trace a call of `original` itself as this stand-in again, without end."""
    pefts_own = untraced_copy(original)

    def dequantize_module_weight(module):
        weight = plain_weight(module)
        if weight is not None:
            return weight
        weight = dequantized_4bit_weight(module)
        if weight is not None:
            return weight
        return pefts_own(module)

    return dequantize_module_weight


def untraced_copy(function):
    """The same code under another identity: no stand-in is registered for it, so Dynamo traces (or
    breaks at) PEFT's own lines, exactly as it did before the stand-in."""
    import types

    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


def make_transpose_stand_in(original):
    """The traceable stand-in for PEFT's `transpose(weight, fan_in_fan_out)` (peft/utils/other.py), which
    wraps a parameter's transpose in a new `nn.Parameter` — a constructor Dynamo breaks the graph at
    (every DoRA layer of a Conv1D model, GPT-2's). That new parameter is a leaf of its own: no gradient
    reaches the weight through it, and its own gradient is never read. The stand-in returns the same
    values detached from the weight, so no gradient reaches the weight either; what it does not make is
    the throwaway leaf."""

    def transpose(weight, fan_in_fan_out):
        if not fan_in_fan_out:
            return weight
        if isinstance(weight, torch.nn.Parameter):
            return weight.T.detach()
        return weight.T

    return transpose


def make_cache_clear_stand_in(original):
    """The stand-in for `DoraLinearLayer._cache_clear` (`self._dora_cache.clear()`). In training the
    cache is empty at every forward but the first after eval (PEFT fills it only in eval with caching
    on): traced by Dynamo, an empty cache is read (a guard on its length) rather than cleared, which
    leaves the same empty dict and records no side effect. A filled cache, and every call outside
    torch.compile, goes to PEFT's method."""

    def _cache_clear(self) -> None:
        if torch.compiler.is_compiling() and not self._dora_cache:
            return
        original(self)

    _cache_clear.runlora_stand_in_for = original
    return _cache_clear


def is_pefts_cache_clear(method) -> bool:
    """PEFT's `_cache_clear` as the stand-in knows it: it reads `_dora_cache` and calls `clear`, nothing
    else. A PEFT that changed it keeps its own method (its checkpointed DoRA layers then run eagerly)."""
    code = getattr(method, "__code__", None)
    return code is not None and set(code.co_names) == {"_dora_cache", "clear"}


class _NotSet:
    """The token of a `set` the stand-in did not record: its `reset` records nothing either."""


NOT_SET = _NotSet()


def runs_default_forwards(value) -> bool:
    """kernels' value of `_ACTIVE_KERNEL_FUNCS`: {id: (the model's kernel function module, the forward it runs)};
    True where every one runs its class's own forward (no hub kernel selected), which falls back to the
    original function whether the variable is read or not."""
    return isinstance(value, dict) and all(
        isinstance(entry, tuple) and len(entry) == 2 and entry[1] is type(entry[0]).forward
        for entry in value.values())


def make_context_set_stand_in(original):
    def set(self, value):   # noqa: A001 (kernels' method name)
        if torch.compiler.is_compiling() and runs_default_forwards(value):
            return NOT_SET
        return original(self, value)

    set.runlora_stand_in_for = original
    return set


def make_context_reset_stand_in(original):
    def reset(self, token):
        if token is NOT_SET:
            return None
        return original(self, token)

    reset.runlora_stand_in_for = original
    return reset


def is_kernels_context_var_method(method) -> bool:
    """kernels' `CompileableContextVar.set` / `reset` as the stand-ins know them: a context variable and a
    global one behind `uses_global_var`. A kernels that changed them keeps its own methods."""
    code = getattr(method, "__code__", None)
    return code is not None and {"uses_global_var", "global_var", "context_var"} <= set(code.co_names)


# (module, function, the stand-in's maker): PEFT's functions that Dynamo cannot trace in a DoRA layer.
STAND_INS = (("peft.utils.integrations", "dequantize_module_weight", make_stand_in),
             ("peft.utils.other", "transpose", make_transpose_stand_in))

# (module, class, method, guard on PEFT's method, the stand-in's maker): methods Dynamo cannot trace
# inside a checkpointed region, set on PEFT's class because Dynamo inlines methods as they are.
METHOD_STAND_INS = (("peft.tuners.lora.dora", "DoraLinearLayer", "_cache_clear", is_pefts_cache_clear,
                     make_cache_clear_stand_in),
                    ("kernels._internals.layer.layer", "CompileableContextVar", "set", is_kernels_context_var_method,
                     make_context_set_stand_in),
                    ("kernels._internals.layer.layer", "CompileableContextVar", "reset",
                     is_kernels_context_var_method, make_context_reset_stand_in))


def install() -> bool:
    """Register each stand-in once its module is imported: now for those imported already, right after the
    import for the others (peft is never imported for this: it costs seconds). True when every stand-in of
    an installed library is registered."""
    pending = []
    for module_name, name, make in STAND_INS:
        module = sys.modules.get(module_name)
        if module is None:
            pending += [module_name] if _installed_library(module_name) else []
            continue
        original = getattr(module, name, None)
        if original is None or original in _installed:   # a peft without it: nothing of it breaks the graph
            continue
        try:
            torch.compiler.substitute_in_graph(original, skip_signature_check=True)(make(original))
        except ValueError:   # someone registered a handler for it already: theirs stays
            continue
        _installed.append(original)
    for module_name, class_name, name, is_pefts, make in METHOD_STAND_INS:
        module = sys.modules.get(module_name)
        if module is None:
            pending += [module_name] if _installed_library(module_name) else []
            continue
        cls = getattr(module, class_name, None)
        original = cls.__dict__.get(name) if cls is not None else None
        if original is None or hasattr(original, "runlora_stand_in_for") or not is_pefts(original):
            continue
        setattr(cls, name, make(original))
        _installed.append(original)
    for module_name in dict.fromkeys(pending):
        _register_after_import(module_name)
    return not pending


def _installed_library(module_name: str) -> bool:
    """Is the library the module belongs to installed (so that it may be imported later)? kernels comes with
    transformers 5.25 and later only: where it is not installed, nothing of it can break a graph."""
    import importlib.util

    try:
        return importlib.util.find_spec(module_name.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


class _PeftFinder:
    """On sys.meta_path until `module_name` is imported: installs the stand-ins right after."""

    def __init__(self, module_name: str):
        self.module_name = module_name

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.module_name:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_install(loaded):
            exec_module(loaded)
            try:
                install()
            except Exception:   # never break importing peft: at worst DoRA layers break the graph, as before
                pass

        spec.loader.exec_module = exec_and_install
        return spec


def _register_after_import(module_name: str) -> None:
    if not any(isinstance(f, _PeftFinder) and f.module_name == module_name for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftFinder(module_name))
