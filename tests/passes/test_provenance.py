"""Module provenance (passes/provenance.py): a site's PEFT module path and adapter, from Dynamo's
nn_module_stack metadata."""

import pytest
import torch
from torch.fx import Graph

from lora_rewrite.passes.provenance import UNKNOWN_MODULE, Provenance, clean_module_path, provenance_of


@pytest.mark.parametrize("raw,path", [
    ("L['self'].__dict__['_modules']['base_model'].__dict__['_modules']['model']", "base_model.model"),
    ("L['self'].base_model.model.layers._modules['0'].self_attn.q_proj", "base_model.model.layers.0.self_attn.q_proj"),
    ("L['self']._modules['proj']", "proj"),
    ("L['fn'].proj", "proj"),
    ("L__self___base_model_model_proj", "base_model_model_proj"),
    ("L['self'].base_model.model.proj.lora_A['default']", "base_model.model.proj.lora_A.default"),
])
def test_dynamo_module_paths_are_relative_to_the_compiled_frame(raw, path):
    assert clean_module_path(raw) == path


def node_with_module_stack(stack: dict):
    node = Graph().placeholder("x")
    node.meta["nn_module_stack"] = stack
    return node


def test_a_node_inside_lora_a_belongs_to_its_lora_module_and_adapter():
    stack = {
        "L__self___base_model_model_proj": ("L['self'].base_model.model.proj", torch.nn.Module),
        "L__self___base_model_model_proj_lora_A_default@1": ("L['self'].base_model.model.proj.lora_A['default']",
                                                             torch.nn.Linear),
    }
    assert provenance_of(node_with_module_stack(stack)) == Provenance(
        "base_model.model.proj", "default", "L__self___base_model_model_proj")


def test_a_node_outside_any_adapter_names_its_innermost_module_or_nothing():
    stack = {"L__self___mlp": ("L['self'].mlp", torch.nn.Module),
             "L__self___mlp_up": ("L['self'].mlp.up", torch.nn.Linear)}
    assert provenance_of(node_with_module_stack(stack)) == Provenance("mlp.up", None, None)
    assert provenance_of(Graph().placeholder("x")) == Provenance(UNKNOWN_MODULE, None, None)
