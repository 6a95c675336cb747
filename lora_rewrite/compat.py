"""The one home of torch-internal imports (torch 2.11 through 2.15).

Everything underscored that lora_rewrite touches is imported here, so a torch release that moves
something breaks this file and nothing else. Each helper says which versions differ and how.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

aten = torch.ops.aten
prims = torch.ops.prims


# --- Inductor entry points ------------------------------------------------------------------------

def compile_fx(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, config_patches: dict,
               inner_compile: Callable | None = None):
    """Inductor's public-ish top-level compiler; same signature in 2.11, 2.13 and 2.15."""
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    if inner_compile is None:
        return _compile_fx(gm, example_inputs, config_patches=config_patches)
    return _compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=config_patches)


def compile_fx_inner(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """Inductor's own `inner_compile` (code generation): what runs when no other is given."""
    from torch._inductor.compile_fx import compile_fx_inner as _inner

    return _inner(gm, example_inputs, **kwargs)


def eager_inner_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **_: Any):
    """An Inductor `inner_compile` that generates no code: the partitioned graph runs op by op.

    Inductor's decompositions, joint-graph passes (ours included) and min-cut partitioner still run,
    so the graphs are exactly those Inductor would compile. Used by the `codegen=False` option.
    """
    return run_op_by_op(gm)


def run_op_by_op(gm: torch.fx.GraphModule):
    """The compiled function of a graph that runs its aten ops one by one (no code generation)."""
    from functorch.compile import make_boxed_func

    return make_boxed_func(gm.forward)


def eager_backward_compile():
    """Compile the backward graph together with the forward (AOTAutograd compiles it lazily, at the
    first backward, by default): the dump then holds both partitioned graphs after one forward."""
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        return functorch_config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def inductor_config():
    import torch._inductor.config as config

    return config


def inductor_config_keys() -> set[str]:
    return set(inductor_config().get_config_copy().keys())


def mode_config_patches(mode: str | None) -> dict:
    """What `torch.compile(mode=...)` would set for Inductor (`list_mode_options` exists 2.11-2.15)."""
    if mode is None or mode == "default":
        return {}
    return dict(torch._inductor.list_mode_options(mode, None))


def custom_graph_pass_base():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


def existing_passes(value: Any) -> tuple:
    """A config slot's passes as a tuple: 2.11 holds one callable, 2.13+ a callable or a list."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


def stable_topological_sort(graph: torch.fx.Graph) -> None:
    from torch._inductor.pattern_matcher import stable_topological_sort as _sort

    _sort(graph)


def mutates_inputs(target: Any) -> bool:
    """Does this op write to one of its arguments (an in-place or out= op)? Read off its schema, which
    every OpOverload carries (`_schema`, the same in 2.11-2.15); other callables: False."""
    schema = getattr(target, "_schema", None)
    return schema is not None and schema.is_mutable


# --- fake tensors and symbolic shapes -------------------------------------------------------------

def detect_fake_mode(values: Sequence[Any]):
    from torch._guards import detect_fake_mode as _detect

    return _detect(list(values))


def unset_fake_temporarily():
    from torch._subclasses.fake_tensor import unset_fake_temporarily as _unset

    return _unset()


def statically_known_true(expr: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true as _skt

    return bool(_skt(expr))


def size_hint(value: Any) -> int | None:
    """A concrete value for a possibly symbolic int, adding no guard; None when none is known.

    2.13+ have `optimization_hint`; 2.11 has `ShapeEnv.size_hint` (its module-level `size_hint`
    helper was removed in 2.13). An expression with an unbacked symbol (a data-dependent size, e.g. the
    rows `x[mask]` selects) has no hint: `optimization_hint` would answer with a made-up fallback
    value, and evaluating a condition on it raises GuardOnDataDependentSymNode.
    """
    if isinstance(value, int):
        return value
    if not isinstance(value, torch.SymInt):
        return None
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    if free_unbacked_symbols(value):
        return None
    node = value.node
    hint = getattr(node, "_hint", None)
    if hint is not None:
        return int(hint)
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(value))
    except ImportError:
        pass
    except Exception:
        return None
    try:
        result = node.shape_env.size_hint(node.expr, allow_none=True)
    except TypeError:
        result = node.shape_env.size_hint(node.expr)
    except Exception:
        return None
    if result is None:
        return None
    try:
        return int(result)
    except TypeError:
        return None


def guard_bool(expr: Any) -> bool:
    """Evaluate a symbolic condition, recording a guard (Dynamo adds it to the frame's guards)."""
    return bool(expr)


def sym_expr(value: Any) -> str:
    if isinstance(value, torch.SymInt):
        return str(value.node.expr)
    return str(value)


# --- autograd / partitioner ----------------------------------------------------------------------

def must_recompute_policy():
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_RECOMPUTE


def must_save_policy():
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE


def tagged_for_recomputation(node) -> bool:
    """The node carries a recompute tag: runlora's, or activation checkpointing's for its region."""
    from torch.utils.checkpoint import CheckpointPolicy

    return node.meta.get("recompute") in (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)


# --- dynamo -----------------------------------------------------------------------------------------

def reset_dynamo() -> None:
    """Forget every compiled frame and Dynamo's caches (`torch._dynamo.reset`, 2.11-2.15)."""
    torch._dynamo.reset()


@contextlib.contextmanager
def dynamo_compile_limits_at_least(limit: int) -> Iterator[None]:
    """Raise Dynamo's per-code-object compile limits to at least `limit` for a block. `recompile_limit`
    is the current name and `cache_size_limit` the older one (2.13 has both); each is patched where it
    exists."""
    config = torch._dynamo.config
    limits = {key: max(limit, getattr(config, key))
              for key in ("recompile_limit", "cache_size_limit") if hasattr(config, key)}
    with config.patch(**limits):
        yield


def dynamo_recompile_limit() -> int:
    """How many compiles Dynamo keeps per code object before it runs the frame eagerly for good."""
    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return int(getattr(config, key))


def frame_compile_number() -> int | None:
    """How many compiles of the frame being compiled came before this one (the N of `[frame/N]` in
    TORCH_LOGS); None outside a Dynamo frame compile. `CompileId.frame_compile_id`, 2.11-2.15."""
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
    except Exception:
        return None
    number = getattr(cid, "frame_compile_id", None) if cid is not None else None
    return number if isinstance(number, int) else None


@contextlib.contextmanager
def recorded_graph_breaks() -> Iterator[list[str]]:
    """Every graph break Dynamo meets in the block, as it logs it: "Graph break in user code at FILE:LINE",
    "Graph Break Reason: …", "User code traceback: …". Dynamo writes that to its `graph_breaks` log artifact
    (TORCH_LOGS="graph_breaks") only when the artifact is on; the block turns it on for itself, keeps the
    records from every other handler, and leaves the logger as it found it (2.11-2.15: the artifact logger
    of torch/_dynamo/symbolic_convert.py)."""
    import logging

    from torch._dynamo import symbolic_convert

    logger = symbolic_convert.graph_break_log
    records: list[str] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Recorder(logging.DEBUG)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    if not logger.isEnabledFor(logging.DEBUG):   # on only for this block: nothing else sees its records
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def dynamo_counters():
    from torch._dynamo.utils import counters

    return counters


def registered_backend_names() -> set[str]:
    from torch._dynamo.backends import registry

    return set(registry._COMPILER_FNS)


def register_backend(name: str, fn: Callable) -> None:
    from torch._dynamo.backends.registry import register_backend as _register

    _register(compiler_fn=fn, name=name)


def compile_id() -> str | None:
    """The `[frame/attempt]` id of the compile in progress, as TORCH_LOGS prints it."""
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
        return None if cid is None else str(cid)
    except Exception:
        return None


# --- compile caches ---------------------------------------------------------------------------------

def compile_cache_dir() -> str:
    """Inductor's cache folder (TORCHINDUCTOR_CACHE_DIR, or its per-user default under the temp dir).
    `torch._inductor.runtime.cache_dir_utils.cache_dir` exists 2.11-2.15 (and since 2.3); should it
    move, the environment variable Inductor reads is the answer."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:
        import os

        return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
            __import__("tempfile").gettempdir(), "torchinductor_runlora")
    return cache_dir()


def compile_caches_disabled() -> bool:
    """True when no compile cache can serve a graph (`force_disable_caches`, or TORCHINDUCTOR_FORCE_DISABLE_CACHES)."""
    return bool(inductor_config().force_disable_caches)


def autograd_cache_hits() -> int:
    """AOTAutograd's count of cache hits in this process (the counter exists 2.11-2.15). A hit serves
    the compiled forward and backward without tracing the joint graph: our pass does not run."""
    return int(dynamo_counters()["aot_autograd"]["autograd_cache_hit"])


def autocast_state() -> tuple:
    """The ambient autocast settings, which change what AOTAutograd traces and so what the pass sees."""
    state = []
    for device in ("cpu", "cuda"):
        try:
            state.append((device, torch.is_autocast_enabled(device), str(torch.get_autocast_dtype(device))))
        except (TypeError, RuntimeError):
            state.append((device, None, None))
    return tuple(state)


# --- structured trace (tlparse) ---------------------------------------------------------------------

def trace_artifact(name: str, payload_fn: Callable[[], str], encoding: str = "string") -> None:
    from torch._logging import trace_structured

    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": name, "encoding": encoding},
        payload_fn=payload_fn,
    )


@contextlib.contextmanager
def fresh_compile_caches() -> Iterator[None]:
    """Inductor's and AOTAutograd's compile caches off for a block, so every compile runs our pass.

    `force_disable_caches` (torch.compiler.config's, aliased in Inductor's config 2.11-2.15) also
    turns Dynamo's profile-guided dynamic shapes off, and Dynamo says so with a UserWarning
    ("dynamo_pgo force disabled …") on every compile: that is what we asked for, so it is not shown.
    """
    import warnings

    with inductor_config().patch(force_disable_caches=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled", category=UserWarning)
        yield
