"""Writing a chosen forward and backward variant into the joint graph, in place of a matched site.

The variant functions of `lora_rewrite.variants` run here on `GraphOps`, which emits one FX node per
op with its fake-tensor value, so Inductor's later passes, the partitioner and the lowering see
ordinary aten nodes. A site is rewritten all or nothing: every new value is built and checked
(shape and dtype equal to the value it replaces) before any use is redirected; on any failure the new
nodes are erased and the graph is exactly as it was.

What is replaced, per site (see passes/site.py for the names):

    out               ← the forward variant's Y
    dA, dB            ← the backward variant's gradients
    dX (DxMode.TOTAL) ← the base's dY·W summand becomes the variant's whole dX, and the adapter's
                        summand leaves the sum (the sum's value is unchanged)
    dX (DxMode.LORA)  ← the adapter's dX_a = z1·A

and whatever the site's kind replaces besides (`SiteKind.replacements`: DoRA's mns and dm). What the
variants read is the kind's to build (`SiteKind.forward_operands`, `backward_operands`: passes/kind_lora.py,
passes/kind_dora.py); everything else here is the same for every kind. `rewrite_site` returns a
`RewrittenSite`: what was emitted, with the products later passes reuse (`SiteProducts`: passes/fuse.py fuses
siblings' X·Aᵀ and dA = Z1ᵀ·X through it).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Graph, Node

from lora_rewrite import compat
from lora_rewrite.containment import SiteHalfRewritten, Stage
from lora_rewrite.forms import FormPlan
from lora_rewrite.options import RunLoraOptions
from lora_rewrite.variants import BackwardResult, DxMode, ForwardResult, Ops, Variant
from lora_rewrite.passes.fx import (PERMUTE, ROLE_META, RUNLORA_NODE, VIEWS, dtype, erase_unused, is_call, is_tangent,
                                    made_by_runlora, prims, same_shape, shape)
from lora_rewrite.passes.site import Site

aten = torch.ops.aten

# Node metadata carried over from the node a new node stands in for. "recompute" and "ac_graph_id" are
# activation checkpointing's tags (torch.utils.checkpoint under torch.compile): the partitioner recomputes
# a tagged region in the backward and saves only its inputs. A new node without them would be saved like
# any other, and a checkpointed model would hold more for backward than stock Inductor's (measured before
# this: 3× on a tiny Llama, 1300 MB against 580 MB on Llama-60m with DoRA).
COPIED_META = ("stack_trace", "nn_module_stack", "fwd_nn_module_stack", "source_fn_stack",
               "fwd_source_fn_stack", "seq_nr", "partitioner_tag", "autograd_backward", "from_node",
               "recompute", "ac_graph_id")


class RewriteError(Exception):
    """A rewritten value did not check out; the graph was left as it was."""


@dataclass(frozen=True)
class SiteProducts:
    """The products of a rewritten site that later passes reuse, as nodes of the graph."""

    forward_xa: Node | None     # X·Aᵀ [N,r] of the forward variant (forward1)
    backward_xa: Node | None    # Z2 = X·Aᵀ [N,r] the backward variant recomputes (backward1/5); the same
                                # node as forward_xa when both exist (GraphOps emits a product once)
    grad_a: Node | None         # dA = Z1ᵀ·X [r,i] (backward1/2/5); None where dA = (s·B)ᵀ·Zt
    z1: Node | None             # that product's Z1 = dY·(s·B) [N,r]


@dataclass(frozen=True)
class RewrittenSite:
    """What `rewrite_site` did to one site."""

    site: Site
    forward: Variant
    backward: Variant | None
    new_nodes: tuple[Node, ...]   # every node it added, in the order it added them
    products: SiteProducts
    forms: dict = dataclasses.field(default_factory=dict)   # the product forms it was written in


class GraphOps(Ops):
    """`ops` that append FX nodes to a graph, each with its fake value (meta["val"]); every product
    with a form (lora_rewrite.forms) in the form `forms` names for its role."""

    def __init__(self, graph: Graph, fake_mode, forms: FormPlan | None = None):
        super().__init__(forms)
        self.graph = graph
        self.fake_mode = fake_mode
        self.created: list[Node] = []
        self._created_set: set[Node] = set()
        self._template: Node | None = None
        self._memo: dict = {}
        self._roles: list = []   # the product roles (lora_rewrite/forms.py) being emitted, innermost last

    @contextlib.contextmanager
    def like(self, template: Node):
        """New nodes are inserted before `template` and inherit its provenance metadata."""
        previous = self._template
        self._template = template
        try:
            with self.graph.inserting_before(template):
                yield
        finally:
            self._template = previous

    def call(self, target, *args, **kwargs) -> Node:
        key = (target, _freeze(args), _freeze(kwargs))
        if key in self._memo:
            return self._memo[key]
        node = self.graph.call_function(target, args, kwargs)
        self.created.append(node)
        self._created_set.add(node)
        template = self._template
        if template is not None:
            for k in COPIED_META:
                if k in template.meta:
                    node.meta[k] = template.meta[k]
        node.meta["val"] = self._fake_value(target, args, kwargs)
        node.meta[RUNLORA_NODE] = True
        if self._roles:   # which product of the variant it is part of: the site pictures' label
            node.meta[ROLE_META] = self._roles[-1].name
        self._memo[key] = node
        return node

    def _fake_value(self, target, args, kwargs):
        def to_val(a):
            if isinstance(a, Node):
                return a.meta["val"]
            if isinstance(a, (list, tuple)):
                return type(a)(to_val(x) for x in a)
            return a

        with self.fake_mode:
            return target(*to_val(list(args)), **{k: to_val(v) for k, v in kwargs.items()})

    def value(self, a):
        return a.meta["val"]

    def pick(self, role, candidates):
        self._roles.append(role)
        try:
            return super().pick(role, candidates)
        finally:
            self._roles.pop()

    def has_rows(self, a):
        """Certainly at least one row, for every value a symbolic size may take (an unbacked N may be 0)."""
        return compat.statically_known_true(a.meta["val"].shape[0] >= 1)

    def t(self, a):
        # (aᵀ)ᵀ is a itself: a product form never stacks two transposed views of one tensor.
        if is_call(a, PERMUTE) and list(a.args[1]) == [1, 0]:
            return a.args[0]
        return super().t(a)

    def recompute(self, a):
        # The partitioner must recompute this value in the backward rather than save it. Only
        # values built here are tagged (s = 1 hands B itself back from `scale`); a view (a transposed
        # form's result) is tagged together with the product it views.
        node = a
        while node in self._created_set:
            node.meta["recompute"] = compat.must_recompute_policy()
            if not is_call(node, PERMUTE, *VIEWS):
                break
            node = node.args[0]
        return a

    def save(self, a):
        # The partitioner must save this value rather than recompute it in the backward from its inputs
        # (a sum of a 16-bit and a 32-bit product would otherwise be recomputed from both, held at 6 bytes
        # an element instead of 4) — except inside a checkpointed region, whose tag it inherited and keeps.
        if a in self._created_set and "recompute" not in a.meta:
            a.meta["recompute"] = compat.must_save_policy()
        return a

    def erase_created(self) -> None:
        """Erase every node this GraphOps created (none of them may be in use outside it yet)."""
        erase_unused(self.graph, self.created, erasable=self._created_set.__contains__)
        self.created.clear()
        self._created_set.clear()
        self._memo.clear()


def _freeze(x: Any):
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, Node):
        return ("node", id(x))
    if isinstance(x, (int, float, bool, str, type(None), torch.dtype, torch.device)):
        return x
    return ("obj", id(x))


def matrix_2d(ops: GraphOps, node: Node, n_arg, cols: int) -> Node:
    """node as [N, cols]: itself when 2-D, else a reshape (a view when its layout allows)."""
    if len(shape(node)) == 2:
        return node
    return ops.reshape(node, [n_arg, cols])


def check_same(new: Node, old: Node, what: str) -> None:
    if not same_shape(shape(new), shape(old)) or dtype(new) != dtype(old):
        raise RewriteError(f"{what}: rewritten value is {dtype(new)}{list(shape(new) or ())}, "
                           f"expected {dtype(old)}{list(shape(old) or ())}")


def summed_output(ops: GraphOps, site: Site, y: Node) -> Node:
    """A forward variant's Y [N,o] as the old sum `out` holds it: cast where PEFT cast the adapter's term to
    the base's dtype before the sum (its bnb layers: Y rounded once), viewed to out's shape; checked."""
    chain = site.forward
    if chain.term_cast is not None:
        y = ops.cast(y, dtype(chain.out))
    if chain.out_shape_args is not None:
        y = ops.view(y, chain.out_shape_args)
    check_same(y, chain.out, "forward")
    return y


def base_weight_io(ops: GraphOps, site: Site) -> Node:
    """Wᵀ [i,o] as the base's input-gradient product reads W: the forward product's operand, or the
    transpose of the [o,i] weight the backward's product reads (a 4-bit base's dequantized weight)."""
    dx_sum = site.backward.dx_sum
    return ops.t(dx_sum.weight) if dx_sum.weight is not None else dx_sum.w_io


def first_gradient(ops: GraphOps, site: Site) -> Node:
    """The first of the site's gradient nodes in graph order: the new ones are inserted before it."""
    grads = site.backward
    order = {n: k for k, n in enumerate(ops.graph.nodes)}
    replaced = [n for n in (grads.grad_a, grads.grad_b, grads.grad_x_lora, grads.dx_sum and grads.dx_sum.base_mm)
                if n]
    return min(replaced, key=order.__getitem__)


def output_gradient_2d(ops: GraphOps, site: Site) -> Node:
    """dY as [N,o]."""
    chain, grads = site.forward, site.backward
    n_arg = chain.n_arg if grads.dy_shape_args2d is None else grads.dy_shape_args2d[0]
    return matrix_2d(ops, grads.dy, n_arg, site.dims.o)


def dx_in_rows(site: Site) -> bool:
    grads = site.backward
    return grads.dx_mode is DxMode.TOTAL and grads.dx_sum.leaves_graph


def gradient_replacements(ops: GraphOps, site: Site, grad_a: Node, grad_b: Node, grad_x: Node | None) -> dict:
    """{old node: new node} for dA, dB and the input gradient a backward variant returned, checked."""
    grads = site.backward
    replacements = {grads.grad_b: grad_b}
    if grads.grad_a is not None:   # a kind whose A is frozen has no dA to replace
        replacements[grads.grad_a] = grad_a
    if grads.dx_mode is DxMode.LORA:
        replacements[grads.grad_x_lora] = grad_x
    elif grads.dx_mode is DxMode.TOTAL:
        dx_sum = grads.dx_sum
        # dX folded with Z1 is a column slice of [dY·W′ | Z1] (copied to rows by the variant where it
        # leaves the graph): reshaped, a view where its strides allow.
        sliced = is_call(grad_x, aten.slice.Tensor)
        if dx_sum.view_args is not None:
            grad_x = (ops.reshape if sliced else ops.view)(grad_x, dx_sum.view_args)
        if dx_sum.cast_to is not None:
            grad_x = ops.cast(grad_x, dx_sum.cast_to)
        replacements[dx_sum.base_end] = grad_x
    for old, new in replacements.items():
        check_same(new, old, "backward")
    return replacements


def rewrite_site(graph: Graph, fake_mode, site: Site, forward: Variant, backward: Variant | None,
                 forms: FormPlan | None = None, options: RunLoraOptions | None = None) -> RewrittenSite:
    """Replace the site's forward (and, when `backward` is given, its gradients) in place, each product
    in the form `forms` names for its role (lora_rewrite.forms; default forms where it names none). What
    the variants read is the site's kind's to build (`SiteKind.forward_operands`, `backward_operands`), and
    what it replaces besides Y, dA, dB and dX (`SiteKind.replacements`); the rest is the same for every kind.

    Raises RewriteError, leaving the graph untouched, if any new value does not check out, and
    SiteHalfRewritten if redirecting the uses fails (the graph is then half rewritten: the pass
    restores it, lora_rewrite/containment.py)."""
    options = options if options is not None else RunLoraOptions()
    ops = GraphOps(graph, fake_mode, forms)
    kind = site.kind
    try:
        with ops.like(site.forward.out):
            forward_result = forward.compute(ops, kind.forward_operands(ops, site, forward, options))
            replacements = {site.forward.out: summed_output(ops, site, forward_result.y)}
        backward_result = None
        with ops.like(first_gradient(ops, site) if backward is not None else site.forward.out):
            if backward is not None:
                backward_result = backward.compute(ops, kind.backward_operands(ops, site, backward, forward_result))
                replacements.update(gradient_replacements(ops, site, backward_result.grad_a, backward_result.grad_b,
                                                          backward_result.grad_x))
            for old, new in kind.replacements(ops, site, forward_result, backward_result).items():
                check_same(new, old, f"{kind.name}")
                replacements[old] = new
    except Exception as e:
        try:
            ops.erase_created()
        except Exception as cleanup:   # new nodes may be left in the graph: the caller restores it
            raise SiteHalfRewritten(Stage.REWRITE, cleanup) from e
        if isinstance(e, RewriteError):
            raise
        raise RewriteError(f"{type(e).__name__}: {e}") from e

    try:
        _redirect_uses(graph, site, backward, replacements, set(ops.created), options)
    except Exception as e:   # uses already redirected cannot be taken back here: the caller restores the graph
        raise SiteHalfRewritten(Stage.REWRITE, e) from e
    return RewrittenSite(site, forward, backward, tuple(ops.created), _products(forward_result, backward_result),
                         dict(forms or {}))


def _redirect_uses(graph: Graph, site: Site, backward: Variant | None, replacements: dict[Node, Node],
                   new_nodes: set[Node], options: RunLoraOptions) -> None:
    """Point every use of the site's old values at the new ones, then erase what lost its last user."""
    keep_unsaved(site.anchor)
    if options.enabled("recompute_upcasts"):
        for node in upcasts_worth_recomputing(site):
            keep_unsaved(node)
    if backward is not None and site.backward.dx_mode is DxMode.TOTAL:
        # The adapter's summand leaves dX's sum: its add now passes the other summand through.
        dx_sum = site.backward.dx_sum
        lora_add = dx_sum.lora_add
        other = lora_add.args[1] if lora_add.args[0] is dx_sum.lora_end else lora_add.args[0]
        lora_add.replace_all_uses_with(other)
    for old, new in replacements.items():
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in new_nodes)
    # The site's old nodes that lost their last user go, and so do their inputs that only they used;
    # nodes runlora created (for this site or an earlier one) stay.
    erase_unused(graph, site.nodes(), erasable=lambda node: not made_by_runlora(node))


def _products(forward: ForwardResult, backward: BackwardResult | None) -> SiteProducts:
    z1 = backward.z1 if backward is not None else None
    return SiteProducts(
        forward_xa=forward.xa,
        backward_xa=backward.xa if backward is not None else None,
        grad_a=backward.grad_a if z1 is not None else None,
        z1=z1,
    )


def keep_unsaved(node: Node) -> None:
    """If the old X·Aᵀ survives (its backward was not rewritten), it is still not to be saved."""
    node.meta["recompute"] = compat.must_recompute_policy()


def upcasts_worth_recomputing(site: Site) -> list[Node]:
    """Casts the backward would otherwise keep a wider copy of: X cast up to the adapter's dtype (PEFT's
    default fp32 adapters on a bf16 model), and parameters cast for the computation (autocast). Saving
    the narrower source and redoing the cast costs one elementwise pass and halves what is held."""
    found = []
    fwd = site.forward
    roots = [fwd.x, fwd.a, fwd.b] + ([fwd.base_product.w_io] if fwd.base_product.w_io is not None else [])
    for root in roots:
        node = root
        chain = []
        while is_call(node, aten.permute.default, aten.t.default, *VIEWS):
            chain.append(node)
            node = node.args[0]
        if not is_call(node, prims.convert_element_type.default):
            continue
        source = node.args[0]
        widened = dtype(source) is not None and dtype(source).itemsize < dtype(node).itemsize
        parameter = isinstance(source, Node) and source.op == "placeholder" and not is_tangent(source)
        if widened or (parameter and root is not fwd.x):
            found += chain + [node]
    return found
