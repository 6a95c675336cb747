"""Timing and memory, as docs/BENCHMARKING.md asks: every implementation in one process,
interleaved round-robin, medians with their min–max spread.

- First step: each implementation runs once (compile included: that is its compile time), with
  Inductor's and AOTAutograd's compile caches off so every implementation compiles from scratch.
- Warm-up: `warmup` more round-robin rounds, untimed.
- Timed: `rounds` round-robin rounds (A B C D, A B C D, …), continued until every implementation
  has at least `min_run_time` seconds of timed steps.
- A step is forward + backward of a scalar loss; trainable gradients are set to None before it
  (outside the timed region), so every step allocates its gradients the same way.
- Memory: on CUDA the peak of `torch.cuda.max_memory_allocated` during one step over what was
  allocated before it (what the paper's table reports); everywhere, the bytes autograd saves for
  backward (`torch.autograd.graph.saved_tensors_hooks`, each storage once, the model's parameters
  and buffers excluded since they are alive anyway). On CPU the latter is the memory column.

Nothing here prints: progress is reported through the `on_step` callback.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lora_rewrite import hardware
from lora_rewrite.hardware import synchronize


@dataclass
class Implementation:
    """One row of the table: `forward_loss()` returns the scalar loss of a fresh batch."""

    name: str
    forward_loss: Callable[[], torch.Tensor]
    module: torch.nn.Module              # the uncompiled model: its parameters and buffers
    runlora: bool = False


def under_autocast(forward_loss: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """forward_loss run under torch.autocast(bfloat16), as Trainer(bf16=True) runs a forward; the backward
    runs outside it, as there."""
    def autocast_loss():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return forward_loss()

    return autocast_loss


@dataclass
class Measurement:
    name: str
    runlora: bool = False
    samples_s: list = field(default_factory=list)
    page_faults: list = field(default_factory=list)   # minor page faults of each timed step (CPU)
    first_step_s: float | None = None
    peak_bytes: int | None = None          # CUDA: peak over the allocation before the step
    saved_bytes: int | None = None         # bytes saved for backward (parameters excluded)
    runlora_counters: dict = field(default_factory=dict)
    runlora_choices: dict = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.samples_s)

    @property
    def min_s(self) -> float:
        return min(self.samples_s)

    @property
    def max_s(self) -> float:
        return max(self.samples_s)


def _clear_grads(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def timed_step(impl: Implementation, device: torch.device) -> float:
    """Seconds of one forward + backward (the device synchronised on both sides)."""
    _clear_grads(impl.module)
    synchronize(device)
    start = time.perf_counter()
    impl.forward_loss().backward()
    synchronize(device)
    return time.perf_counter() - start


def first_steps(impls: Sequence[Implementation], device: torch.device, results: dict[str, Measurement],
                on_step: Callable[[str], None] | None = None) -> None:
    """Run each implementation once: its compile time, and the runlora report of what it rewrote."""
    from lora_rewrite.compat import dynamo_counters, fresh_compile_caches
    from lora_rewrite.debug import collect_reports

    for impl in impls:
        counters_before = dict(dynamo_counters()["runlora"])
        with fresh_compile_caches(), collect_reports() as reports:
            results[impl.name].first_step_s = timed_step(impl, device)
        if impl.runlora:
            after = dynamo_counters()["runlora"]
            results[impl.name].runlora_counters = {k: after[k] - counters_before.get(k, 0) for k in after
                                                   if after[k] - counters_before.get(k, 0)}
            results[impl.name].runlora_choices = summarize_reports(reports)
        if on_step:
            on_step(impl.name)


def summarize_reports(reports) -> dict:
    """{"sites": n, "skipped": {reason: n}, "choices": {"forward2/backward5 (i=512 o=512 r=8 N=1024; forms: dB
    transposed)": count},
    "fused": {"groups": n, "products": n}} (sibling fusion)."""
    choices: dict[str, int] = {}
    skipped: dict[str, int] = {}
    sites = 0
    fused = {"groups": 0, "products": 0}
    for report in reports:
        for f in report.fused:
            fused["groups"] += 1
            fused["products"] += len(f.modules)
        for s in report.sites:
            sites += 1
            key = f"{s.forward}/{s.backward or '-'} (i={s.i} o={s.o} r={s.r} N={s.N_used}; forms: {s.forms_text()})"
            choices[key] = choices.get(key, 0) + 1
        for k in report.skipped:
            skipped[k.reason] = skipped.get(k.reason, 0) + 1
    return {"sites": sites, "skipped": skipped, "choices": choices, "fused": fused}


def round_robin(impls: Sequence[Implementation], device: torch.device, results: dict[str, Measurement], *,
                warmup: int, rounds: int, min_run_time: float = 0.0, max_rounds: int = 10_000,
                on_step: Callable[[str], None] | None = None,
                on_extra_round: Callable[[], None] | None = None) -> None:
    """Warm up, then time round-robin rounds until `rounds` are done and each implementation has at
    least `min_run_time` seconds of samples (or `max_rounds`)."""
    for _ in range(warmup):
        for impl in impls:
            timed_step(impl, device)
            if on_step:
                on_step(impl.name)
    done = 0
    while done < max_rounds:
        enough_time = all(sum(results[i.name].samples_s) >= min_run_time for i in impls)
        if done >= rounds and enough_time:
            break
        if done >= rounds and on_extra_round:
            on_extra_round()
        for impl in impls:
            faults = minor_page_faults()
            results[impl.name].samples_s.append(timed_step(impl, device))
            results[impl.name].page_faults.append(minor_page_faults() - faults)
            if on_step:
                on_step(impl.name)
        done += 1


def alternating_medians(run: Callable[[str], None], names: Sequence[str], rounds: int) -> dict[str, float]:
    """Median seconds of `run(name)` for each name over `rounds` interleaved rounds, the order reversed every
    other round: the same-process A/Bs of scripts/ (ab_*.py)."""
    times: dict[str, list] = {name: [] for name in names}
    for k in range(rounds):
        for name in (list(names) if k % 2 == 0 else list(names)[::-1]):
            start = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def ab_summary(title: str, median: dict[str, float], old: str) -> list[str]:
    """The lines an A/B script prints: each median and overhead over `frozen`, then runlora against `old`,
    against stock Inductor, and the A/A (inductor-again against inductor)."""
    lines = [title] + [f"  {name:15s} {t * 1e3:7.2f} ms  overhead {t / median['frozen'] - 1:+.3f}"
                       for name, t in median.items()]
    lines.append(f"  runlora vs {old} {1 - median['runlora'] / median[old]:+.1%}, "
                 f"vs inductor {1 - median['runlora'] / median['inductor']:+.1%}, "
                 f"A/A {1 - median['inductor-again'] / median['inductor']:+.1%}")
    return lines


def saved_for_backward_bytes(impl: Implementation) -> int:
    """Bytes of the distinct storages autograd saves for backward during one step's forward; the
    model's own parameters and buffers are excluded (saving them costs no memory)."""
    resident = {t.untyped_storage().data_ptr() for t in impl.module.parameters()}
    resident |= {t.untyped_storage().data_ptr() for t in impl.module.buffers()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    _clear_grads(impl.module)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = impl.forward_loss()
    loss.backward()
    return sum(storages.values())


def cuda_peak_bytes(impl: Implementation, device: torch.device) -> int:
    """Peak allocated during one step minus what was allocated before it (the paper's memory column)."""
    _clear_grads(impl.module)
    gc.collect()
    torch.cuda.empty_cache()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    impl.forward_loss().backward()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure_memory(impls: Sequence[Implementation], device: torch.device, results: dict[str, Measurement],
                   on_step: Callable[[str], None] | None = None) -> None:
    for impl in impls:
        if device.type == "cuda":
            results[impl.name].peak_bytes = cuda_peak_bytes(impl, device)
        results[impl.name].saved_bytes = saved_for_backward_bytes(impl)
        _clear_grads(impl.module)
        if on_step:
            on_step(impl.name)


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return ("CUDA peak: torch.cuda.max_memory_allocated during one step minus the allocation before it "
                "(after reset_peak_memory_stats)")
    return ("bytes saved for backward (torch.autograd.graph.saved_tensors_hooks, each storage once, "
            "parameters and buffers excluded)")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
INT_MAX = 2**31 - 1


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory in the process for reuse: no mmap for large blocks
    (M_MMAP_MAX = 0) and no trimming of the heap's top (M_TRIM_THRESHOLD = INT_MAX).

    By default every block above a moving threshold (128 KiB to 32 MiB) is mmap-ed and given back when
    freed, and the heap's top is trimmed: a step's fresh [N,o] buffers are faulted in page by page again,
    thousands of minor page faults a step, more or fewer depending on what ran before (docs/BENCHMARKS.md,
    "Page faults"). With it, after a few warm-up steps, no step faults: the timings measure the kernels.
    Process-wide, for good: glibc has no way back to its adaptive defaults."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        raise RuntimeError("--keep-freed-memory needs glibc's malloc (mallopt); this process has none")
    for param, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, INT_MAX)):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"glibc's mallopt({param}, {value}) failed")


def minor_page_faults() -> int:
    """This process's minor page faults so far (0 where the platform does not count them)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def machine_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "cpu": hardware.cpu_model_name(),
        "cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    for package in ("transformers", "peft"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info
