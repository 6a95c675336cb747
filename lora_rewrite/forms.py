"""Product forms: the physical form each matrix product of a variant runs in.

A variant (lora_rewrite/variants.py) fixes the bracketing: which products, with how many FLOPs. How
each product is then lowered is a second, independent choice the FLOP count cannot see:

    direct       C = P·Q                     the product as the equation writes it
    transposed   C = (Qᵀ·Pᵀ)ᵀ                the same FLOPs, the BLAS call on the other orientation;
                                             C comes back as a transposed view (no copy)
    separate     Z1 = dY·(s·B) on its own    one more pass over dY [N,o]
    folded       [dY·W | Z1] = dY·[W | s·B]  Z1 as r extra output columns of the input-gradient
                                             product, which reads dY anyway (r ≪ i)

No form copies W, X or dY into a transposed layout: a transposed operand is a view the BLAS call
reads as stored. Which form wins depends on the shapes, the dtype, the device and its BLAS: at
512², N = 4096, r = 8 on a 2-thread CPU dB = dYᵀ·Z2 runs 7× faster transposed, at 1024², r = 64 the
other way round. So the default is to measure (lora_rewrite/tuning.py) and keep what was measured.

`ROLES` is the one list of products that have forms; each variant names the role of every product it
emits through `pick`. The forms of a site are a dict {role name: form} (`FormPlan`); a role it does
not name runs in its first (default) form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

DIRECT = "direct"
TRANSPOSED = "transposed"
SEPARATE = "separate"
FOLDED = "folded"

ORIENTATIONS = (DIRECT, TRANSPOSED)


@dataclass(frozen=True)
class Role:
    """One product a variant emits whose form can be chosen; `forms[0]` is the default."""

    name: str
    equation: str
    forms: tuple[str, ...]


XA = Role("XA", "X·Aᵀ [N,r] (forward1)", ORIENTATIONS)
Z2 = Role("Z2", "Z2 = X·Aᵀ [N,r], recomputed in the backward", ORIENTATIONS)
Z1 = Role("Z1", "Z1 = dY·(s·B) [N,r]", ORIENTATIONS)
GRAD_A = Role("dA", "dA = Z1ᵀ·X [r,i]", ORIENTATIONS)
GRAD_B = Role("dB", "dB = s·dYᵀ·Z2 [o,r]", ORIENTATIONS)
ZT = Role("Zt", "Zt = dYᵀ·X [o,i]", ORIENTATIONS)
Z1_IN_DX = Role("Z1_in_dX", "[dY·W | Z1] = dY·[W | s·B]: Z1 as extra columns of the dX product", (SEPARATE, FOLDED))

ROLES: tuple[Role, ...] = (XA, Z2, Z1, GRAD_A, GRAD_B, ZT, Z1_IN_DX)
ROLE_BY_NAME: dict[str, Role] = {role.name: role for role in ROLES}

# {role name: form}; a role not named runs in its default form.
FormPlan = Mapping[str, str]


def form_of(forms: FormPlan, role: Role) -> str:
    return forms.get(role.name, role.forms[0])


def scaled_mm(ops, p, q, s=1):
    """s·(P·Q) as one BLAS call: `addmm(Q[0], P, Q, beta=0, alpha=s)` (beta = 0: the first argument, a
    row of Q that broadcasts to [m,n], is never read), so a Python scale costs no elementwise pass and
    no kernel of its own; P·Q where s is 1; (P·Q)·s for a tensor (0-d) scale, and where Q may have no
    rows to take (N = 0)."""  # 2·m·k·n FLOPs
    if _is_one(s):
        return ops.mm(p, q)
    if is_number(s) and ops.has_rows(q):
        return ops.addmm(ops.row(q, 0), p, q, alpha=s, beta=0)
    # A tensor scale, or Q may have no rows (the token count N is the inner dimension of dB = dYᵀ·Z2,
    # and a data-dependent N can be 0): the scale on the result, which is rank-sized where this happens.
    return ops.scale(ops.mm(p, q), s)


def product(ops, role: Role, p, q, s=1):
    """C = s·P·Q in the form `ops` picks for `role`: direct s·P·Q, or transposed (s·Qᵀ·Pᵀ)ᵀ, the
    scale inside the BLAS call (`scaled_mm`)."""  # 2·m·k·n either way
    return ops.pick(role, {
        DIRECT: lambda: scaled_mm(ops, p, q, s),
        TRANSPOSED: lambda: ops.t(scaled_mm(ops, ops.t(q), ops.t(p), s)),
    })


def is_number(s) -> bool:
    """A Python scale rides inside a product as addmm's alpha; a tensor scale (a 0-d node) cannot."""
    return isinstance(s, (int, float)) and not isinstance(s, bool)


def _is_one(s) -> bool:
    return is_number(s) and s == 1


def check_forms(forms: Mapping[str, str]) -> None:
    """A ValueError naming the valid roles and forms, for a user's forced forms."""
    if not isinstance(forms, Mapping):
        raise ValueError(f"forced forms must be a dict {{role: form}}, got {forms!r}")
    for name, form in forms.items():
        role = ROLE_BY_NAME.get(name)
        if role is None:
            raise ValueError(f"unknown product role {name!r} in runlora option 'forms'; valid roles are "
                             f"{sorted(ROLE_BY_NAME)!r}")
        if form not in role.forms:
            raise ValueError(f"runlora option 'forms': role {name!r} has forms {list(role.forms)!r}, got {form!r}")


class FixedForms:
    """The `pick` of ops that run given forms (EagerOps, GraphOps): each role in its planned form."""

    forms: FormPlan

    def pick(self, role: Role, candidates: dict[str, Callable]):
        return candidates[form_of(self.forms, role)]()
