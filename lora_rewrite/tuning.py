"""Measured forms: which form each product of a chosen variant runs in, timed once per machine and shape.

`measure_stage` runs one variant (forward or backward stage, base product included) on random tensors
of the site's exact shapes, dtype, device and weight layout through `MeasuringOps`: at each product
with a choice (lora_rewrite.forms) every candidate form is run and timed on the real operands, the
fastest is kept — the default form unless another is MARGIN faster, so noise never flips a choice —
and the stage goes on with that form's result, so each later product is timed on the layouts the
earlier choices produce (a transposed Z1 is column-major when dA reads it). For the "time" criterion
the whole stage is then timed once more in the chosen forms: it compares variants by that number.

Results are kept for the process (a model's identical layers measure once) and in a persistent JSON
file, `<Inductor's cache dir>/runlora/forms.json` (or RUNLORA_CACHE_DIR), keyed by the device's name
and thread count, torch's version, the dtype, the variant and the shapes: a machine measures a shape
once, not every process. Writes merge with what another process wrote meanwhile and replace the file
atomically. RUNLORA_TIME_REPEATS sets the timed calls per candidate (default 5).

This runs at compile time on the compiling device and allocates the site's activations once more
(X [N,i], dY [N,o] and the products); on a GPU that is nearly full, use options={"forms": "direct"}.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lora_rewrite import compat, hardware
from lora_rewrite.forms import Role
from lora_rewrite.variants import BackwardOperands, Dims, DxMode, EagerOps, ForwardOperands, Variant

MARGIN = 0.03           # another form must be 3 % faster than the default to be chosen
ENV_CACHE_DIR = "RUNLORA_CACHE_DIR"
ENV_REPEATS = "RUNLORA_TIME_REPEATS"
CACHE_FILE = "forms.json"
CACHE_VERSION = 2     # 2: the key holds dx_in_rows
LONG_CALL_S = 0.05      # a call this long is timed 3 times at most: its median is already stable


def time_call(fn: Callable, device: torch.device, repeats: int) -> tuple[float, object]:
    """(seconds, the last call's result): the median wall time of `fn()` over `repeats` calls after
    one warm-up call. A long call (LONG_CALL_S, e.g. a whole input-gradient product) is timed twice in
    all, the warm-up included, and the faster kept: a first call is only ever slower, and at that
    length one more sample costs more compile time than its noise is worth."""
    def timed():
        start = time.perf_counter()
        result = fn()
        hardware.synchronize(device)
        return time.perf_counter() - start, result

    first, result = timed()
    if first > LONG_CALL_S:
        second, result = timed()
        return min(first, second), result
    samples: list[float] = []
    for _ in range(repeats):
        seconds, result = timed()
        samples.append(seconds)
        if len(samples) >= 3 and statistics.median(samples) > LONG_CALL_S:
            break
    return statistics.median(samples), result


class MeasuringOps(EagerOps):
    """EagerOps that choose each role's form by timing every candidate on the operands at hand."""

    def __init__(self, device: torch.device, repeats: int):
        super().__init__()
        self.device = device
        self.repeats = repeats
        self.seconds: dict[str, dict[str, float]] = {}

    def pick(self, role: Role, candidates: dict[str, Callable]):
        if role.name in self.forms:
            return candidates[self.forms[role.name]]()
        # A candidate may itself contain a product with a choice (Z1 inside the separate dX): the
        # warm-up call of time_call decides that one first.
        times, results = {}, {}
        for form, fn in candidates.items():
            times[form], results[form] = time_call(fn, self.device, self.repeats)
        default = role.forms[0]
        fastest = min(times, key=times.get)
        self.forms[role.name] = fastest if times[fastest] < (1 - MARGIN) * times[default] else default
        self.seconds[role.name] = times
        return results[self.forms[role.name]]


class RoleRecordingOps(EagerOps):
    """EagerOps that note which roles a stage has a choice for, running each in its default form."""

    def __init__(self):
        super().__init__()
        self.roles: list[str] = []

    def pick(self, role: Role, candidates: dict[str, Callable]):
        self.roles.append(role.name)
        return super().pick(role, candidates)


@dataclass(frozen=True)
class StageShape:
    """Everything a stage's measurement depends on besides the device (all hashable)."""

    variant: str
    N: int
    i: int
    o: int
    r: int
    dx: str | None               # DxMode value, or None: X needs no gradient
    dtype: torch.dtype
    weight_stored_as_io: bool    # W stored as [i,o] (Conv1D) rather than nn.Linear's [o,i]
    dx_in_rows: bool = False     # dX leaves the graph and must be in rows (BackwardOperands.dx_in_rows)

    def key(self, device: torch.device) -> str:
        return json.dumps([CACHE_VERSION, hardware.device_description(device), torch.__version__,
                           str(self.dtype), self.variant, self.N, self.i, self.o, self.r, self.dx,
                           self.weight_stored_as_io, self.dx_in_rows])


@dataclass(frozen=True)
class StageMeasurement:
    forms: dict                                   # {role name: chosen form}
    candidates: dict = field(default_factory=dict)  # {role name: {form: seconds}}
    seconds: float = 0.0                          # the whole stage in the chosen forms (0: not timed)
    from_disk: bool = False


def _stage_runner(variant: Variant, shape: StageShape, device: torch.device) -> Callable:
    """run(ops): the stage on random tensors of the shape (never zeros), as the rewritten graph has it;
    on the meta device, on tensors without data (to see which roles the stage has)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*dims):
        if device.type == "meta":
            return torch.empty(*dims, dtype=shape.dtype, device=device)
        return torch.randn(*dims, generator=g, dtype=torch.float32).to(device=device, dtype=shape.dtype)

    n, i, o, r = shape.N, shape.i, shape.o, shape.r
    x, a, b, bias = rand(n, i), rand(r, i) / i ** 0.5, rand(o, r) / r ** 0.5, rand(o)
    w_io = rand(i, o) / i ** 0.5 if shape.weight_stored_as_io else (rand(o, i) / i ** 0.5).t()
    if variant.stage == "forward":
        if variant.merges_weight:
            return lambda ops: variant.compute(ops, ForwardOperands(x=x, a=a, b=b, s=2.0, w_io=w_io, bias=bias))
        return lambda ops: variant.compute(ops, ForwardOperands(x=x, a=a, b=b, s=2.0,
                                                                base=ops.addmm(bias, x, w_io)))
    operands = BackwardOperands(dy=rand(n, o), x=x, a=a, b=b, s=2.0, w_io=w_io,
                                dx=DxMode(shape.dx) if shape.dx else None, dx_in_rows=shape.dx_in_rows)
    return lambda ops: variant.compute(ops, operands)


class FormCache:
    """The persistent measurements: one JSON file of {key: measurement}, shared by processes."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self._directory = directory
        self._entries: dict | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        directory = self._directory or os.environ.get(ENV_CACHE_DIR) or \
            os.path.join(compat.compile_cache_dir(), "runlora")
        return Path(directory) / CACHE_FILE

    def _read(self) -> dict:
        try:
            entries = json.loads(self.path.read_text())
            return entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> StageMeasurement | None:
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            entry = self._entries.get(key)
        if not isinstance(entry, dict):
            return None
        try:
            return StageMeasurement(dict(entry["forms"]), dict(entry["candidates"]), float(entry["seconds"]),
                                    from_disk=True)
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: str, m: StageMeasurement) -> None:
        entry = {"forms": m.forms, "candidates": m.candidates, "seconds": m.seconds}
        with self._lock:
            entries = self._read()
            entries[key] = entry
            self._entries = entries
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".forms-", suffix=".json")
                with os.fdopen(fd, "w") as f:
                    json.dump(entries, f, indent=0, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError as e:  # a read-only cache dir costs a re-measurement next process, nothing more
                from lora_rewrite.debug import log

                log.warning("runlora could not write its form measurements to %s: %s", self.path, e)


CACHE = FormCache()


def measure_stage(variant: Variant, shape: StageShape, device: torch.device, *,
                  stage_time: bool = False) -> StageMeasurement:
    """The forms `variant` runs fastest in at this shape and each candidate's time; with `stage_time`
    (the "time" criterion) also the whole stage's time in those forms."""
    device = torch.device(device)
    return _measure_stage(variant, shape, device.type, device.index, _repeats(), stage_time)


def _repeats() -> int:
    try:
        return max(1, int(os.environ.get(ENV_REPEATS, "5")))
    except ValueError:
        return 5


@functools.lru_cache(maxsize=None)
def _measure_stage(variant: Variant, shape: StageShape, device_type: str, device_index: int | None,
                   repeats: int, stage_time: bool) -> StageMeasurement:
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    key = shape.key(device)
    cached = CACHE.get(key)
    if cached is not None and (cached.seconds > 0 or not stage_time):
        return cached
    # This runs inside the compiler, where fake tensors are active: time real ones.
    with compat.unset_fake_temporarily(), torch.no_grad():
        if not stage_time and not _roles_of(variant, shape):
            return StageMeasurement({}, {})   # nothing to choose (forward2): nothing to run or to keep
        run = _stage_runner(variant, shape, device)
        if cached is None:
            ops = MeasuringOps(device, repeats)
            run(ops)
            forms, candidates = dict(ops.forms), ops.seconds
        else:
            forms, candidates = cached.forms, cached.candidates
        seconds = time_call(lambda: run(EagerOps(forms)), device, repeats)[0] if stage_time else 0.0
    measurement = StageMeasurement(forms, candidates, seconds)
    CACHE.put(key, measurement)
    return measurement


def _roles_of(variant: Variant, shape: StageShape) -> list[str]:
    """The roles `variant` has a choice for at this shape, from one run on data-less tensors."""
    ops = RoleRecordingOps()
    _stage_runner(variant, shape, torch.device("meta"))(ops)
    return ops.roles


def stage_shape(variant: Variant, dims: Dims, dx: DxMode | None, dtype: torch.dtype,
                weight_stored_as_io: bool, dx_in_rows: bool = False) -> StageShape:
    backward_dx = dx is not None and variant.stage == "backward"
    return StageShape(variant.name, int(dims.N), dims.i, dims.o, dims.r, dx.value if backward_dx else None,
                      dtype, bool(weight_stored_as_io), bool(dx_in_rows) and backward_dx)
