"""Pictures: the speedup bars, and the map of the chosen variant over tokens × rank (the paper's
Figures 2 and 3) for one layer shape X[N,i], W[o,i], A[r,i], B[o,r].

The map is computed from our own cost model, `lora_rewrite.cost.choose` over the ordered lists
FORWARDS and BACKWARDS of `lora_rewrite.variants` — the same call the graph pass makes for a site of
that shape — with the flops criterion by default. Adapters only reduce the parameter count below the
line r·(i + o) < i·o, i.e. r < i·o / (i + o), drawn dashed as in the paper.

matplotlib runs on the Agg backend (files only, no display).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lora_rewrite.cost import choose
from lora_rewrite.variants import BACKWARDS, FORWARDS, Dims, Variant

# One colour per variant, the same in every picture.
VARIANT_COLORS = {
    "forward1": "#4C72B0", "forward2": "#DD8452",
    "backward1": "#4C72B0", "backward2": "#55A868", "backward3": "#C44E52",
    "backward4": "#8172B3", "backward5": "#DD8452",
}
MAP_CRITERIA = ("flops", "roofline")   # "time" would run every variant at every grid point


@dataclass
class VariantMap:
    """The chosen forward and backward variant at every (rank, tokens) grid point."""

    i: int
    o: int
    tokens: list[int]
    ranks: list[int]
    forward: list[list[str]]     # [rank index][token index] → variant name
    backward: list[list[str]]
    criterion: str

    @property
    def parameter_reduction_rank(self) -> float:
        """r·(i + o) < i·o holds strictly below this rank."""
        return self.i * self.o / (self.i + self.o)


def legal_candidates(variants: Sequence[Variant], allow_merged: bool) -> list[Variant]:
    """The merged-weight variants need the base and the adapter to read the same X in the same dtype
    (no dropout, adapters in the model's dtype)."""
    return [v for v in variants if allow_merged or not v.merges_weight]


def variant_map(i: int, o: int, tokens: Sequence[int], ranks: Sequence[int], *, criterion: str = "flops",
                needs_dx: bool = True, allow_merged: bool = True, dtype=None, device=None) -> VariantMap:
    if criterion not in MAP_CRITERIA:
        raise ValueError(f"a variant map is computed with one of {MAP_CRITERIA}, got {criterion!r}")
    forwards = legal_candidates(FORWARDS, allow_merged)
    backwards = legal_candidates(BACKWARDS, allow_merged)
    fwd_rows, bwd_rows = [], []
    for r in ranks:
        fwd_row, bwd_row = [], []
        for n in tokens:
            dims = Dims(N=int(n), i=i, o=o, r=int(r), needs_dx=needs_dx)
            fwd_row.append(choose(forwards, dims, criterion, dtype=dtype, device=device, stage="forward").variant.name)
            bwd_row.append(choose(backwards, dims, criterion, dtype=dtype, device=device, stage="backward").variant.name)
        fwd_rows.append(fwd_row)
        bwd_rows.append(bwd_row)
    return VariantMap(i, o, [int(n) for n in tokens], [int(r) for r in ranks], fwd_rows, bwd_rows, criterion)


def log_grid(low: int, high: int, points: int) -> list[int]:
    """Distinct integers, geometrically spaced from `low` to `high` inclusive."""
    return sorted({int(round(v)) for v in np.geomspace(low, high, points)})


def default_map_axes(i: int, o: int, measured_tokens: Sequence[int] = (), measured_ranks: Sequence[int] = ()):
    """Tokens from 16 to 2^17 (or past the measured N), ranks from 1 to min(i, o) (or the measured r), so
    the parameter-reduction line i·o / (i + o) ≤ min(i, o) is always inside."""
    top_tokens = max([2**17, *[2 * n for n in measured_tokens]])
    top_rank = max([min(i, o), *measured_ranks])
    return log_grid(16, top_tokens, 72), log_grid(1, top_rank, 56)


def _agg_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _edges(values: Sequence[int]) -> np.ndarray:
    """Cell edges on a log axis: geometric midpoints between neighbours."""
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return np.array([v[0] / 1.5, v[0] * 1.5])
    mid = np.sqrt(v[:-1] * v[1:])
    return np.concatenate([[v[0] ** 2 / mid[0]], mid, [v[-1] ** 2 / mid[-1]]])


def plot_variant_map(vmap: VariantMap, path, *, points: Sequence[tuple[int, int]] = (), title: str = "") -> None:
    """Two panels (forward, backward): the chosen variant coloured over tokens (x, log) × rank (y, log);
    the dashed line r = i·o / (i + o) (parameter reduction below it); measured (N, r) as crosses."""
    plt = _agg_pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), constrained_layout=True)
    for ax, stage, names in ((axes[0], "forward", vmap.forward), (axes[1], "backward", vmap.backward)):
        present = sorted({n for row in names for n in row}, key=lambda n: (len(n), n))
        index = {n: k for k, n in enumerate(present)}
        grid = np.array([[index[n] for n in row] for row in names])
        cmap = ListedColormap([VARIANT_COLORS.get(n, "#999999") for n in present])
        ax.pcolormesh(_edges(vmap.tokens), _edges(vmap.ranks), grid, cmap=cmap, vmin=-0.5,
                      vmax=len(present) - 0.5, shading="flat")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(vmap.parameter_reduction_rank, color="black", linestyle="--", linewidth=1.2)
        for n, r in points:
            ax.plot([n], [r], marker="x", color="black", markersize=9, markeredgewidth=2)
        ax.set_xlabel("tokens N (batch × sequence)")
        ax.set_ylabel("rank r")
        ax.set_title(f"best {stage} ({vmap.criterion})")
        handles = [Patch(color=VARIANT_COLORS.get(n, "#999999"), label=n) for n in present]
        handles.append(plt.Line2D([], [], color="black", linestyle="--",
                                  label=f"r·(i+o) = i·o (r ≈ {vmap.parameter_reduction_rank:.0f}): "
                                        "fewer parameters below"))
        if points:
            handles.append(plt.Line2D([], [], color="black", marker="x", linestyle="", label="measured"))
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8)
    fig.suptitle(title or f"Chosen variant for X[N,{vmap.i}]·W[{vmap.o},{vmap.i}]ᵀ + LoRA (i={vmap.i}, o={vmap.o})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _implementation_colors(names: Sequence[str]) -> dict[str, str]:
    """Fixed colours: Inductor blue, the frozen floor grey, the runlora rows from one palette."""
    palette = ["#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3"]
    colors, k = {}, 0
    for name in names:
        if name == "inductor":
            colors[name] = "#4C72B0"
        elif name == "frozen":
            colors[name] = "#9E9E9E"
        else:
            colors[name] = palette[k % len(palette)]
            k += 1
    return colors


def plot_speedups(cases, path) -> None:
    """Bars of speedup (%) of every implementation over eager (left) and over stock Inductor (right),
    one group per case; whiskers span the speedups the min and max samples would give. The frozen
    base model is the floor: no LoRA implementation can beat it."""
    import textwrap

    plt = _agg_pyplot()

    impl_names: list[str] = []
    for case in cases:
        for row in case.rows:
            if row.implementation != "eager" and row.implementation not in impl_names:
                impl_names.append(row.implementation)
    colors = _implementation_colors(impl_names)
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 3.0 + 1.8 * len(cases) * 2), 5.2), constrained_layout=True)
    for ax, reference_name in ((axes[0], "eager"), (axes[1], "inductor")):
        panel_names = [n for n in impl_names if n != reference_name]
        width = 0.8 / max(1, len(panel_names))
        for k, name in enumerate(panel_names):
            xs, heights, low, high = [], [], [], []
            for c, case in enumerate(cases):
                rows = {r.implementation: r for r in case.rows}
                row, ref = rows.get(name), rows.get(reference_name)
                if row is None or ref is None or row is ref:
                    continue
                xs.append(c + (k - (len(panel_names) - 1) / 2) * width)
                speedup = (ref.median_ms - row.median_ms) / ref.median_ms * 100
                heights.append(speedup)
                low.append(speedup - (ref.median_ms - row.max_ms) / ref.median_ms * 100)
                high.append((ref.median_ms - row.min_ms) / ref.median_ms * 100 - speedup)
            if xs:
                label = "frozen (floor)" if name == "frozen" else name
                ax.bar(xs, heights, width=width, label=label, color=colors[name], yerr=[low, high], capsize=3,
                       hatch="//" if name == "frozen" else None)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([textwrap.fill(c.title, 20) for c in cases], fontsize=8)
        ax.set_ylabel(f"speedup over {reference_name}, % of its time saved")
        ax.set_title(f"vs {reference_name} (median; whiskers: min–max)")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
