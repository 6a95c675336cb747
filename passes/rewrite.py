"""Writing a chosen forward and backward variant into the joint graph, in place of a matched site.

The variant functions of `lora_rewrite.variants` run here on `GraphOps`, which emits one FX node per
op with its fake-tensor value, so Inductor's later passes, the partitioner and the lowering see
ordinary aten nodes. A site is rewritten all or nothing: every new value is built and checked
(shape and dtype equal to the value it replaces) before any use is redirected; on any failure the new
nodes are erased and the graph is exactly as it was.

What is replaced, per site (see passes/match.py for the names):

    out               ← the forward variant's Y
    dA, dB            ← the backward variant's gradients
    dX (mode "total") ← the base's dY·W summand becomes the variant's whole dX, and the adapter's
                        summand leaves the sum (the sum's value is unchanged)
    dX (mode "lora")  ← the adapter's dX_a = z1·A
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.fx import Graph, Node

from lora_rewrite import compat
from lora_rewrite.variants import BackwardOperands, ForwardOperands, Variant
from lora_rewrite.passes.match import Site, VIEWS, dtype, is_call, same_shape, shape

aten = torch.ops.aten
prims = torch.ops.prims

# Node metadata carried over from the node a new node stands in for.
COPIED_META = ("stack_trace", "nn_module_stack", "fwd_nn_module_stack", "source_fn_stack",
               "fwd_source_fn_stack", "seq_nr", "partitioner_tag", "autograd_backward", "from_node")


class RewriteError(Exception):
    pass


class GraphOps:
    """`ops` that append FX nodes to a graph, each with its fake value (meta["val"])."""

    def __init__(self, graph: Graph, fake_mode):
        self.graph = graph
        self.fake_mode = fake_mode
        self.created: list[Node] = []
        self._created_set: set[Node] = set()
        self._template: Node | None = None
        self._memo: dict = {}

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
        node.meta["runlora"] = True
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

    # the op vocabulary of lora_rewrite.variants
    def mm(self, a, b):
        return self.call(aten.mm.default, a, b)

    def addmm(self, c, a, b):
        return self.call(aten.addmm.default, c, a, b)

    def t(self, a):
        return self.call(aten.permute.default, a, [1, 0])

    def scale(self, a, s):
        if isinstance(s, (int, float)) and s == 1:
            return a
        return self.call(aten.mul.Tensor, a, s)

    def recompute(self, a):
        # The partitioner must recompute this value in the backward rather than save it. Only
        # values built here are tagged (s = 1 hands B itself back from `scale`).
        if a in self._created_set:
            a.meta["recompute"] = compat.must_recompute_policy()
        return a

    # shape plumbing used by the rewrite itself
    def view(self, a, shape_args):
        return self.call(aten.view.default, a, shape_args)

    def reshape(self, a, shape_args):
        return self.call(aten.reshape.default, a, shape_args)

    def cast(self, a, to_dtype):
        return self.call(prims.convert_element_type.default, a, to_dtype)

    def erase_created(self) -> None:
        for node in reversed(self.created):
            if not node.users:
                self.graph.erase_node(node)
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


def _matrix_2d(ops: GraphOps, node: Node, n_arg, cols: int) -> Node:
    """node as [N, cols]: itself when 2-D, else a reshape (a view when its layout allows)."""
    if len(shape(node)) == 2:
        return node
    return ops.reshape(node, [n_arg, cols])


def _check_same(new: Node, old: Node, what: str) -> None:
    if not same_shape(shape(new), shape(old)) or dtype(new) != dtype(old):
        raise RewriteError(f"{what}: rewritten value is {dtype(new)}{list(shape(new) or ())}, "
                           f"expected {dtype(old)}{list(shape(old) or ())}")


def _build_forward(ops: GraphOps, site: Site, variant: Variant) -> Node:
    n_arg, o = site.n_arg, site.dims.o
    with ops.like(site.out):
        if variant.merges_weight:
            lin = site.linear
            operands = ForwardOperands(x=site.x, a=site.a, b=site.b, s=site.scale, w_io=lin.w_io, bias=lin.bias)
        else:
            base = site.base2d if site.base2d is not None else _matrix_2d(ops, site.base, n_arg, o)
            if dtype(base) != site.dtype:
                base = ops.cast(base, site.dtype)
            operands = ForwardOperands(x=site.x, a=site.a, b=site.b, s=site.scale, base=base)
        y = variant.compute(ops, operands)
        if site.out_shape_args is not None:
            y = ops.view(y, site.out_shape_args)
    _check_same(y, site.out, "forward")
    return y


def _build_backward(ops: GraphOps, site: Site, variant: Variant) -> dict[Node, Node]:
    """The replacements {old node: new node} for the site's gradients."""
    n_arg, o = site.n_arg, site.dims.o
    mode = site.dx_mode
    order = {n: k for k, n in enumerate(ops.graph.nodes)}
    replaced = [n for n in (site.grad_a, site.grad_b, site.grad_x_lora, site.dx_sum and site.dx_sum.base_mm) if n]
    with ops.like(min(replaced, key=order.__getitem__)):
        dy = _matrix_2d(ops, site.dy, n_arg if site.dy_shape_args2d is None else site.dy_shape_args2d[0], o)
        w_io = site.linear.w_io if (mode == "total") else None
        operands = BackwardOperands(dy=dy, x=site.x, a=site.a, b=site.b, s=site.scale, w_io=w_io, dx=mode)
        grad_a, grad_b, grad_x = variant.compute(ops, operands)
        replacements = {site.grad_a: grad_a, site.grad_b: grad_b}
        if mode == "lora":
            replacements[site.grad_x_lora] = grad_x
        elif mode == "total":
            dx_sum = site.dx_sum
            if dx_sum.view_args is not None:
                grad_x = ops.view(grad_x, dx_sum.view_args)
            if dx_sum.cast_to is not None:
                grad_x = ops.cast(grad_x, dx_sum.cast_to)
            replacements[dx_sum.base_end] = grad_x
    for old, new in replacements.items():
        _check_same(new, old, "backward")
    return replacements


def rewrite_site(graph: Graph, fake_mode, site: Site, forward: Variant, backward: Variant | None) -> list[Node]:
    """Replace the site's forward (and, when `backward` is given, its gradients) in place; returns the
    new nodes. Raises RewriteError, leaving the graph untouched, if any new value does not check out."""
    ops = GraphOps(graph, fake_mode)
    try:
        y = _build_forward(ops, site, forward)
        replacements = {site.out: y}
        if backward is not None:
            replacements.update(_build_backward(ops, site, backward))
    except Exception as e:
        ops.erase_created()
        if isinstance(e, RewriteError):
            raise
        raise RewriteError(f"{type(e).__name__}: {e}") from e

    new_nodes = set(ops.created)
    keep_unsaved(site.anchor)
    for node in _upcasts_worth_recomputing(site):
        keep_unsaved(node)
    if backward is not None and site.dx_mode == "total":
        # The adapter's summand leaves dX's sum: its add now passes the other summand through.
        lora_add = site.dx_sum.lora_add
        other = lora_add.args[1] if lora_add.args[0] is site.dx_sum.lora_end else lora_add.args[0]
        lora_add.replace_all_uses_with(other)
    for old, new in replacements.items():
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in new_nodes)
    _erase_dead(graph, site)
    return list(ops.created)


def keep_unsaved(node: Node) -> None:
    """If the old X·Aᵀ survives (its backward was not rewritten), it is still not to be saved."""
    node.meta["recompute"] = compat.must_recompute_policy()


def _upcasts_worth_recomputing(site: Site) -> list[Node]:
    """Casts the backward would otherwise keep a wider copy of: X cast up to the adapter's dtype (PEFT's
    default fp32 adapters on a bf16 model), and parameters cast for the computation (autocast). Saving
    the narrower source and redoing the cast costs one elementwise pass and halves what is held."""
    found = []
    roots = [site.x, site.a, site.b] + ([site.linear.w_io] if site.linear is not None else [])
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
        parameter = isinstance(source, Node) and source.op == "placeholder" and "tangents" not in str(source.target)
        if widened or (parameter and root is not site.x):
            found += chain + [node]
    return found


def _erase_dead(graph: Graph, site: Site) -> None:
    """Erase the site's old nodes that no longer have users, and their now-unused inputs."""
    pending = site.nodes()
    seen: set[Node] = set()
    while pending:
        node = pending.pop()
        if node in seen or node.graph is not graph:
            continue
        if node.op in ("placeholder", "output") or node.users or node.meta.get("runlora"):
            continue
        if node.op == "call_function" and compat.mutates_inputs(node.target):
            continue
        seen.add(node)
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        pending.extend(i for i in inputs if i.op == "call_function")
