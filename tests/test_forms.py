"""Product forms (lora_rewrite/forms.py) on real tensors: every form of every variant equals float64 and
never copies X or dY (the FLOPs of every form: tests/test_variants.py, by torch.utils.flop_counter)."""

import pytest
import torch

from lora_rewrite.forms import FOLDED, ROLES, TRANSPOSED, Z1_IN_DX, check_forms
from lora_rewrite.variants import BACKWARDS, BY_NAME, FORWARDS, BackwardOperands, Dims, DxMode, EagerOps, ForwardOperands

ALL_DEFAULT: dict = {}
ALL_OTHER = {role.name: role.forms[1] for role in ROLES}
# Every role flipped alone, then all of them together.
FORM_CASES = {"default": ALL_DEFAULT, "all-other": ALL_OTHER,
              **{f"{role.name}-{role.forms[1]}": {role.name: role.forms[1]} for role in ROLES}}
# W as nn.Linear stores it ([o,i]; the graph reads Wᵀ as a transposed view) and as Conv1D does ([i,o]).
WEIGHT_LAYOUTS = ("linear", "conv1d")


def tensors(N, i, o, r, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=t(N, i), w=t(o, i), bias=t(o), a=t(r, i), b=t(o, r), dy=t(N, o))


def w_io_of(w, layout):
    return w.T if layout == "linear" else w.T.contiguous()


def forward_reference(t, s):
    return t["x"] @ t["w"].T + t["bias"] + s * (t["x"] @ t["a"].T) @ t["b"].T


@pytest.mark.parametrize("layout", WEIGHT_LAYOUTS)
@pytest.mark.parametrize("forms", FORM_CASES.values(), ids=FORM_CASES.keys())
@pytest.mark.parametrize("variant", FORWARDS, ids=lambda v: v.name)
def test_every_forward_form_matches_float64(variant, forms, layout):
    N, i, o, r, s = 19, 12, 20, 3, 0.7
    t64 = tensors(N, i, o, r)
    t = {k: v.float() for k, v in t64.items()}
    w_io = w_io_of(t["w"], layout)
    if variant.merges_weight:
        p = ForwardOperands(x=t["x"], a=t["a"], b=t["b"], s=s, w_io=w_io, bias=t["bias"])
    else:
        p = ForwardOperands(x=t["x"], a=t["a"], b=t["b"], s=s, base=torch.addmm(t["bias"], t["x"], w_io))
    got = variant.compute(EagerOps(forms), p).y
    want = forward_reference(t64, s)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


BACKWARD_CASES = [(v, dx) for v in BACKWARDS for dx in (DxMode.TOTAL, DxMode.LORA, None)
                  if not (v.merges_weight and dx is DxMode.LORA)]


@pytest.mark.parametrize("layout", WEIGHT_LAYOUTS)
@pytest.mark.parametrize("forms", FORM_CASES.values(), ids=FORM_CASES.keys())
@pytest.mark.parametrize("variant,dx", BACKWARD_CASES,
                         ids=lambda c: c.value if isinstance(c, DxMode) else getattr(c, "name", str(c)))
def test_every_backward_form_matches_float64_autograd(variant, dx, forms, layout):
    N, i, o, r, s = 23, 14, 18, 4, 1.7
    t64 = tensors(N, i, o, r, seed=3)
    x, a, b = (t64[k].clone().requires_grad_(True) for k in ("x", "a", "b"))
    lora = s * (x @ a.T) @ b.T
    ((x @ t64["w"].T + lora) if dx is DxMode.TOTAL else lora).backward(t64["dy"])
    t = {k: v.float() for k, v in t64.items()}
    p = BackwardOperands(dy=t["dy"], x=t["x"], a=t["a"], b=t["b"], s=s, w_io=w_io_of(t["w"], layout), dx=dx)
    result = variant.compute(EagerOps(forms), p)
    for name, got, want in (("dA", result.grad_a, a.grad), ("dB", result.grad_b, b.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)
    if dx is None:
        assert result.grad_x is None
    else:
        torch.testing.assert_close(result.grad_x.double(), x.grad, rtol=1e-5, atol=1e-5 * x.grad.abs().max().item())
    if result.z1 is not None:  # what sibling fusion reuses keeps its meaning in every form
        torch.testing.assert_close(result.z1, s * t["dy"] @ t["b"], rtol=1e-5, atol=1e-5)


class CopyWatchingOps(EagerOps):
    """EagerOps that record every tensor an op materialises from a transposed view of a big operand."""

    def __init__(self, forms, big):
        super().__init__(forms)
        self.big = big
        self.copies = []

    def cat(self, tensors, dim):
        self.copies += [t.shape for t in tensors if any(t.data_ptr() == b.data_ptr() for b in self.big)]
        return super().cat(tensors, dim)


@pytest.mark.parametrize("forms", [ALL_DEFAULT, ALL_OTHER], ids=["default", "all-other"])
@pytest.mark.parametrize("variant", BACKWARDS, ids=lambda v: v.name)
def test_no_form_copies_x_or_dy(variant, forms):
    """A transposed operand is a view the product reads as stored: no form concatenates or copies X or
    dY (the fold concatenates W — or W′ — with s·B, an o×(i+r) weight-sized copy, never N-sized)."""
    N, i, o, r = 29, 12, 16, 2
    t = {k: v.float() for k, v in tensors(N, i, o, r).items()}
    ops = CopyWatchingOps(forms, [t["x"], t["dy"]])
    variant.compute(ops, BackwardOperands(dy=t["dy"], x=t["x"], a=t["a"], b=t["b"], s=2.0, w_io=t["w"].T))
    assert ops.copies == []


def test_the_fold_reads_dy_once_for_dx_and_z1():
    """Z1 folded: one product reads dY for both dY·W and Z1 (the r extra columns), none reads it for Z1 alone."""
    N, i, o, r = 31, 10, 14, 3
    t = {k: v.float() for k, v in tensors(N, i, o, r).items()}
    products = []

    class Counting(EagerOps):
        def mm(self, a, b):
            products.append((tuple(a.shape), tuple(b.shape)))
            return super().mm(a, b)

        def addmm(self, c, a, b, alpha=1, beta=1):
            products.append((tuple(a.shape), tuple(b.shape)))
            return super().addmm(c, a, b, alpha=alpha, beta=beta)

    p = BackwardOperands(dy=t["dy"], x=t["x"], a=t["a"], b=t["b"], s=2.0, w_io=t["w"].T)
    BACKWARDS[0].compute(Counting({Z1_IN_DX.name: FOLDED}), p)
    reading_dy = [pq for pq in products if pq[0] == (N, o)]
    assert reading_dy == [((N, o), (o, i + r))]


@pytest.mark.parametrize("forms", [ALL_DEFAULT, ALL_OTHER], ids=["default", "all-other"])
@pytest.mark.parametrize("variant", FORWARDS + BACKWARDS, ids=lambda v: v.name)
def test_a_python_scale_rides_inside_the_products(variant, forms):
    """s as addmm's alpha (beta = 0 where nothing is added): no tensor is scaled on its own — an
    elementwise pass, and one more kernel for Inductor to compile — except s·B where the fold
    concatenates it beside W anyway."""
    N, i, o, r = 29, 12, 16, 2
    t = {k: v.float() for k, v in tensors(N, i, o, r).items()}
    scaled = []

    class ScaleWatching(EagerOps):
        def scale(self, a, s):
            scaled.append(tuple(a.shape))
            return super().scale(a, s)

    ops = ScaleWatching(forms)
    if variant.stage == "forward":
        base = t["x"] @ t["w"].T + t["bias"]
        variant.compute(ops, ForwardOperands(x=t["x"], a=t["a"], b=t["b"], s=2.0, w_io=t["w"].T, bias=t["bias"],
                                             base=base))
        assert scaled == []
        return
    variant.compute(ops, BackwardOperands(dy=t["dy"], x=t["x"], a=t["a"], b=t["b"], s=2.0, w_io=t["w"].T,
                                          dx=DxMode.TOTAL))
    folded = forms.get(Z1_IN_DX.name) == FOLDED and variant.name in ("backward1", "backward2", "backward3",
                                                                    "backward5")
    assert scaled == ([(o, r)] if folded else [])


def test_forced_forms_are_checked_with_the_valid_choices_named():
    check_forms({"dB": TRANSPOSED, "Z1_in_dX": FOLDED})
    with pytest.raises(ValueError, match="valid roles are"):
        check_forms({"dQ": TRANSPOSED})
    with pytest.raises(ValueError, match=r"has forms \['direct', 'transposed'\]"):
        check_forms({"dB": FOLDED})


def test_a_folded_dx_in_rows_is_a_row_major_copy_and_otherwise_a_column_slice():
    """`dx_in_rows` (dX leaves the graph): backward5's folded dX (dX = dY·W′ itself) comes back in rows,
    with the same values; without it, it is the column slice of [dY·W′ | Z1] (no copy)."""
    variant = BY_NAME["backward5"]
    N, i, o, r = 17, 10, 12, 3
    t = {k: v.float() for k, v in tensors(N, i, o, r, seed=5).items()}
    results = {}
    for in_rows in (False, True):
        p = BackwardOperands(dy=t["dy"], x=t["x"], a=t["a"], b=t["b"], s=1.3, w_io=t["w"].T, dx_in_rows=in_rows)
        results[in_rows] = variant.compute(EagerOps({Z1_IN_DX.name: FOLDED}), p).grad_x
    assert results[True].is_contiguous() and results[True].stride() == (i, 1)
    assert results[False].stride() == (i + r, 1)
    torch.testing.assert_close(results[True], results[False], rtol=0, atol=0)
