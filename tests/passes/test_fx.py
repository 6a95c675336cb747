"""The pass's FX vocabulary (passes/fx.py): tangents and the backward region, transposes, values that
are provably the same, scalars, and the dead-node eraser."""

import torch
from torch.fx import Graph
from torch.fx.experimental.proxy_tensor import make_fx

from helpers import joint_graph
from lora_rewrite.passes.fx import (RUNLORA_NODE, SAME_VALUE_DEPTH, backward_region, erase_unused, is_call,
                                    is_tangent, made_by_runlora, matmul_operands, merge_duplicate_casts, same_rows,
                                    same_value, split_scale, strip_layout, transpose_source)

aten = torch.ops.aten
prims = torch.ops.prims


def traced(fn, *inputs) -> Graph:
    """fn's ATen graph, with fake values on its nodes."""
    return make_fx(fn, tracing_mode="fake")(*inputs).graph


def calls(graph: Graph, target) -> list:
    return [n for n in graph.nodes if is_call(n, target)]


def linear(x, w):
    return torch.nn.functional.linear(x, w)


def test_tangents_and_the_backward_region_of_a_joint_graph():
    gm = joint_graph(linear, torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in placeholders if is_tangent(n)] == ["tangents_1"]
    region = backward_region(gm.graph)
    (forward_mm,) = [n for n in gm.graph.nodes if is_call(n, aten.mm.default) and n not in region]
    assert forward_mm.args[0].name == "primals_1" and not is_tangent(forward_mm)
    assert {n.name for n in placeholders if n in region} == {"tangents_1"}
    assert len([n for n in region if is_call(n, aten.mm.default)]) == 2   # dX and dW


def test_an_inference_graph_has_no_backward_region():
    gm = joint_graph(linear, torch.randn(3, 4), torch.randn(5, 4))
    assert backward_region(gm.graph) == set()


def test_transpose_source_sees_every_spelling_of_a_2d_transpose():
    graph = traced(lambda x: (aten.permute(x, [1, 0]), aten.t(x), aten.transpose(x, 0, 1),
                              aten.transpose(x, -1, -2), aten.permute(x, [0, 1])), torch.randn(3, 4))
    x = next(iter(graph.nodes))
    output = graph.output_node().args[0]
    assert [transpose_source(n) is x for n in output] == [True, True, True, True, False]


def test_same_value_through_pure_ops_up_to_its_depth():
    graph = traced(lambda x: (aten.view(x, [-1, 4]), aten.view(x, [3, 4]), aten.view(x.neg(), [3, 4])),
                   torch.randn(12))
    view_inferred, view_spelled, view_of_other = graph.output_node().args[0]
    assert same_value(view_inferred, view_spelled)      # the same view, spelled two ways
    assert not same_value(view_spelled, view_of_other)

    def clones(k):
        def fn(x):
            a = b = x
            for _ in range(k):
                a, b = aten.clone(a), aten.clone(b)
            return a, b
        return graph_outputs(traced(fn, torch.randn(3)))

    assert same_value(*clones(SAME_VALUE_DEPTH))
    assert not same_value(*clones(SAME_VALUE_DEPTH + 1))  # deeper than it looks: not provably the same


def graph_outputs(graph: Graph):
    return graph.output_node().args[0]


def test_strip_layout_and_split_scale():
    graph = traced(lambda x: (aten.view(aten.clone(x), [12]), aten.mul(x, 2.5), aten.mul(x, x)),
                   torch.randn(3, 4))
    x = next(iter(graph.nodes))
    flat, scaled, squared = graph_outputs(graph)
    assert strip_layout(flat) is x
    assert split_scale(scaled) == (x, 2.5)
    assert split_scale(squared) is None


def test_strip_layout_passes_an_expand_only_where_it_changes_nothing():
    graph = traced(lambda x: (aten.expand(x, [2, 3, 4]), aten.expand(x, [5, 2, 3, 4])), torch.randn(2, 3, 4))
    x = next(iter(graph.nodes))
    same, broadcast = graph_outputs(graph)
    assert strip_layout(same) is x and strip_layout(broadcast) is broadcast


def test_same_rows_whatever_the_leading_dims():
    """X as [B,T,i] holds the rows of its [B·T,i] copy; its transpose, or a view with other rows, does not."""
    graph = traced(lambda x: (aten.view(aten.clone(x), [6, 4]), aten.view(x, [3, 8]),
                              aten.clone(aten.transpose(x, 0, 1))), torch.randn(2, 3, 4))
    x = next(iter(graph.nodes))
    rows, other_rows, transposed = graph_outputs(graph)
    assert same_rows(x, rows) and same_rows(rows, x)
    assert not same_rows(x, other_rows) and not same_rows(x, transposed)


def test_matmul_operands_of_an_mm_and_of_the_broadcast_product_of_inner_size_1():
    graph = traced(lambda p, q, m: (aten.mm(p, q), aten.mul(p, q), aten.mul(q, p), aten.mul(m, m)),
                   torch.randn(5, 1), torch.randn(1, 3), torch.randn(5, 3))
    p, q, _ = list(graph.nodes)[:3]
    mm, outer, outer_swapped, elementwise = graph_outputs(graph)
    assert matmul_operands(mm) == (p, q)
    assert matmul_operands(outer) == (p, q) and matmul_operands(outer_swapped) == (p, q)
    assert matmul_operands(elementwise) is None


def test_erase_unused_takes_dead_inputs_along_but_only_what_it_may():
    graph = Graph()
    x = graph.placeholder("x")
    relu = graph.call_function(aten.relu.default, (x,))
    neg = graph.call_function(aten.neg.default, (relu,))
    in_place = graph.call_function(aten.add_.Tensor, (x, 1))
    graph.output(x)

    erase_unused(graph, [neg], erasable=lambda node: node is not relu)
    assert list(graph.nodes) == [x, relu, in_place, graph.output_node()]   # relu was not erasable
    erase_unused(graph, [relu, in_place, x], erasable=lambda node: True)
    assert list(graph.nodes) == [x, in_place, graph.output_node()]  # placeholders and in-place ops stay


def test_the_runlora_tag():
    node = Graph().placeholder("x")
    assert not made_by_runlora(node)
    node.meta[RUNLORA_NODE] = True
    assert made_by_runlora(node)


def cast_graph(view_first: bool, tags: tuple = (None, None)):
    """x [2,3,4] fp32; the model casts it to bf16 and uses it; the pass (tagged) casts it again — of a view
    of x to [6,4] when `view_first` — with `tags` as the two casts' recompute tags."""
    graph = Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(2, 3, 4)
    model_cast = graph.call_function(prims.convert_element_type.default, (x, torch.bfloat16))
    model_use = graph.call_function(aten.neg.default, (model_cast,))
    source = x
    if view_first:
        source = graph.call_function(aten.view.default, (x, [6, 4]))
        source.meta[RUNLORA_NODE] = True
    ours = graph.call_function(prims.convert_element_type.default, (source, torch.bfloat16))
    ours.meta[RUNLORA_NODE] = True
    for node, tag in zip((model_cast, ours), tags):
        if tag is not None:
            node.meta["recompute"] = tag
    our_use = graph.call_function(aten.relu.default, (ours,))
    graph.output((model_use, our_use))
    return graph, model_cast, ours, our_use


def test_merge_duplicate_casts_keeps_the_first_and_a_view_moves_past_the_cast():
    graph, model_cast, ours, our_use = cast_graph(view_first=False)
    assert merge_duplicate_casts(graph) == 1
    assert ours not in graph.nodes and our_use.args == (model_cast,)

    graph, model_cast, ours, our_use = cast_graph(view_first=True)
    assert merge_duplicate_casts(graph) == 1
    (view,) = our_use.args
    assert view.target is aten.view.default and view.args == (model_cast, [6, 4]) and made_by_runlora(view)
    assert len(calls(graph, prims.convert_element_type.default)) == 1
    graph.lint()


def test_merge_duplicate_casts_leaves_casts_under_other_partition_tags_and_the_models_own():
    graph, _, ours, our_use = cast_graph(view_first=False, tags=(None, "must-recompute"))
    assert merge_duplicate_casts(graph) == 0 and our_use.args == (ours,)

    graph = Graph()   # two identical casts, neither the pass's: not this pass's to merge
    x = graph.placeholder("x")
    first, second = (graph.call_function(prims.convert_element_type.default, (x, torch.bfloat16)) for _ in range(2))
    graph.output((first, second))
    assert merge_duplicate_casts(graph) == 0 and len(calls(graph, prims.convert_element_type.default)) == 2
