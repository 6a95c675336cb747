"""How the pass is laid out, read from its source: no import cycle in passes/, each kind of site and each kind
of base named only in its own modules (and the registries that list them), and scripts that switch the pass
through its options rather than by assigning to its names."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PASSES = ROOT / "passes"
PACKAGE = "lora_rewrite.passes"


def imported_modules(path: Path) -> set[str]:
    """Every passes/ module `path` imports, at the top or inside a function (`from lora_rewrite.passes import
    poly` imports the module poly; `from lora_rewrite.passes.fx import …` the module fx)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == PACKAGE:
                found |= {alias.name for alias in node.names if (PASSES / f"{alias.name}.py").exists()}
            elif node.module.startswith(PACKAGE + "."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith(PACKAGE + ".")}
    return found


def import_graph() -> dict[str, set[str]]:
    return {p.stem: imported_modules(p) for p in sorted(PASSES.glob("*.py")) if p.stem != "__init__"}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    return found


def test_no_module_of_passes_imports_itself_back():
    graph = import_graph()
    assert len(graph) >= 20 and sum(map(len, graph.values())) >= 40   # the reading found the package's imports
    assert "fx" in graph["match"] and "kinds" in graph["match"] and "kind_dora" in graph["kinds"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def identifiers(path: Path) -> set[str]:
    """The names a module's code uses or defines: names, attributes, imported modules and names, functions,
    classes, keyword arguments (docstrings and comments are prose, not branches)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom):
            names |= {node.module or ""} | {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
    return names


# The pass's stages and its shared modules: none of them may name a kind of site or of base.
STAGES = sorted(PASSES.glob("*.py")) + [ROOT / "lora_rewrite" / f"{name}.py" for name in
                                        ("debug", "explain", "pictures", "dump", "tuning", "timing", "cost",
                                         "options", "forms", "variants")]
OWN = {
    "DoRA": (("dora",), {"kind_dora", "match_dora", "match_dora_norm", "match_dora_dtypes", "kinds"}),
    "4-bit": (("4bit", "quantized", "bnb", "bitsandbytes", "four_bit"), {"base_4bit", "bases"}),
}


@pytest.mark.parametrize("kind", OWN)
def test_a_kind_is_named_only_in_its_own_modules_and_its_registry(kind):
    words, own = OWN[kind]
    named = {path.relative_to(ROOT).as_posix(): sorted(n for n in identifiers(path) if any(w in n.lower() for w in words))
             for path in STAGES if path.stem not in own}
    assert {path: names for path, names in named.items() if names} == {}
    # and the check reads what it should: the kind's own modules do name it
    assert any(any(w in n.lower() for w in words) for n in identifiers(PASSES / f"{sorted(own)[0]}.py"))


def assignments_to_imported_names(path: Path) -> list[str]:
    """`module.name = …` on an imported module, and setattr / object.__setattr__ calls, in a script."""
    tree = ast.parse(path.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules |= {a.asname or a.name for a in node.names}
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id in modules:
                found.append(f"{path.name}:{node.lineno} {target.value.id}.{target.attr} = …")
        if isinstance(node, ast.Call) and (isinstance(node.func, ast.Name) and node.func.id == "setattr"
                                           or isinstance(node.func, ast.Attribute) and node.func.attr == "__setattr__"):
            found.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}(…)")
    return found


def test_scripts_switch_the_pass_through_its_options():
    scripts = sorted((ROOT / "scripts").glob("*.py"))
    assert len(scripts) >= 10
    assert [found for path in scripts for found in assignments_to_imported_names(path)] == []


def test_the_assignment_finder_finds_a_patch(tmp_path):
    script = tmp_path / "patching.py"
    script.write_text("from lora_rewrite import variants\nimport lora_rewrite.passes as p\n"
                      "variants._x = 1\np.merge_duplicate_casts = None\nobject.__setattr__(variants.FORWARD1, 'a', 1)\n")
    assert len(assignments_to_imported_names(script)) == 3
