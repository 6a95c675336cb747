"""The dump directory, its site pictures, the structured-trace artifacts, and debug output that never
breaks training."""

import json
import logging
import re

import pytest
import torch

from helpers import assert_same_step, peft_linear, run_fresh_python, runlora_counters, step
from lora_rewrite import dump, pictures


def test_dump_dir_holds_graphs_report_and_pictures(tmp_path, caplog):
    model = peft_linear(16, 24, 4)
    compiled = torch.compile(model, backend="runlora", options={"codegen": False, "dump_dir": str(tmp_path)})
    with caplog.at_level(logging.INFO, logger="lora_rewrite"):
        y = compiled(torch.randn(2, 3, 16, requires_grad=True))  # one forward: the backward is compiled with it
    (folder,) = list(tmp_path.iterdir())
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["joint_before.py", "joint_after.py", "forward.py", "backward.py", "report.json",
                            "site0_before.png", "site0_before.svg", "site0_after.png", "site0_after.svg"])
    before, after = (folder / "joint_before.py").read_text(), (folder / "joint_after.py").read_text()
    assert "tangents" in before and before != after and "addmm" in after
    report = json.loads((folder / "report.json").read_text())
    assert report["sites"][0]["module"] == "base_model.model.proj"
    for picture in ("site0_before.png", "site0_after.png"):
        assert (folder / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (folder / "site0_after.svg").read_text()
    said = [r.getMessage() for r in caplog.records if "dumped to" in r.getMessage()]
    assert said == [f"runlora: graph 0/0 dumped to {folder} (1 site picture pair(s))"]
    y.sum().backward()


def test_dump_of_an_inference_graph(tmp_path):
    model = peft_linear(16, 24, 4).eval()
    with torch.no_grad():
        torch.compile(model, backend="runlora", options={"codegen": False, "dump_dir": str(tmp_path)})(torch.randn(4, 16))
    (folder,) = list(tmp_path.iterdir())
    assert {"joint_before.py", "joint_after.py", "inference.py", "report.json"} <= {p.name for p in folder.iterdir()}


# --- the site pictures --------------------------------------------------------------------------------------

def captured_sites(monkeypatch, tmp_path, model, x, **options):
    """Compile with a dump dir, keeping what each site picture is drawn from instead of drawing it."""
    drawn = []
    monkeypatch.setattr(dump, "draw_site", lambda stem, module, site, before, after, kind="joint":
                        drawn.append((module, site, before, after, kind)))
    options = {"codegen": False, "dump_dir": str(tmp_path), "forms": "direct", **options}
    torch.compile(model, backend="runlora", options=options)(x)
    return drawn


def main_labels(picture) -> set[str]:
    return {box.text()[0] for box in picture.boxes.values()}


ATEN_NAME = re.compile(r"\b(mm|addmm|permute|view|mul|add|reshape|primals|tangents|clone|cat|slice)(_\w*)?\b")


def test_site_pictures_label_roles_not_aten_names(monkeypatch, tmp_path):
    x = torch.randn(4, 32, 16, requires_grad=True)   # N = 128 > o: forward2 and backward5 (forced too)
    ((module, site, before, after, kind),) = captured_sites(monkeypatch, tmp_path, peft_linear(16, 24, 4), x,
                                                            forward="forward2", backward="backward5")
    assert (site.forward, site.backward, kind) == ("forward2", "backward5", "joint")
    as_traced = main_labels(before)
    # before: each node as the matcher's record names it (passes/kind_lora.py, the site's equations)
    assert {"X", "W", "A", "B", "base", "dY", "X·Aᵀ", "(X·Aᵀ)·Bᵀ", "s·dY", "Z1 = (s·dY)·B", "dA = Z1ᵀ·X",
            "dB = (s·dY)ᵀ·(X·Aᵀ)", "Y = base + s·(X·Aᵀ)·Bᵀ", "dX = dY·W + Z1·A"} <= as_traced
    # after: each product as the chosen variants' product lists name it (lora_rewrite/variants.py)
    rewritten = main_labels(after)
    assert rewritten == {"X", "W", "A", "B", "bias", "dY", "W + s·B·A", "Y = X·(W + s·B·A)ᵀ", "Z1 = dY·(s·B)",
                         "Z2 = X·Aᵀ", "dA = Z1ᵀ·X", "dB = dYᵀ·Z2", "dX = dY·(W + s·B·A)"}, rewritten
    from lora_rewrite.variants import BACKWARD5, FORWARD2, Dims

    whats = {g.what for g in FORWARD2.gemms(Dims(128, 16, 24, 4)) + BACKWARD5.gemms(Dims(128, 16, 24, 4))}
    for box in after.boxes.values():   # every product's label is its Gemm record's, with the result it is
        if box.kind == "op":
            assert box.label in whats, box.label
    # the scale rides inside the products as alpha: no s·B box, and the beta = 0 addmm's unread first
    # argument (a row of B) is neither drawn nor an edge into dB
    label = {key: box.text()[0] for key, box in after.boxes.items()}
    into_grad_b = {label[src] for src, dst in after.edges if label[dst].startswith("dB")}
    assert into_grad_b == {"dY", "Z2 = X·Aᵀ"}, into_grad_b
    for text in as_traced | rewritten:
        assert not ATEN_NAME.search(text), text
    assert {box.kind for box in after.boxes.values() if box.kind != "op"} == {"input", "parameter"}
    assert {box.label for box in after.boxes.values() if box.kind == "parameter"} == {"W", "A", "B", "bias"}


def test_site_picture_title_names_the_site_the_variants_and_the_cost(monkeypatch, tmp_path):
    x = torch.randn(4, 32, 16, requires_grad=True)
    ((module, site, *_),) = captured_sites(monkeypatch, tmp_path, peft_linear(16, 24, 4), x,
                                           forward="forward2", backward="backward5")
    title = dump.site_title(module, site, "after")
    assert title.startswith("base_model.model.proj, after runlora\n")
    assert "N=128  i=16  o=24  r=4  s=2" in title and "runlora chose forward2 + backward5 (flops)" in title
    assert f"matmul FLOPs {site.flops_before:,} → {site.flops_after:,}" in title


def test_inference_site_picture_has_no_backward(monkeypatch, tmp_path):
    with torch.no_grad():
        ((module, site, before, after, kind),) = captured_sites(monkeypatch, tmp_path, peft_linear(16, 24, 4).eval(),
                                                                torch.randn(2, 64, 16))
    assert kind == "inference" and "forward2 (inference: no backward)" in dump.site_title(module, site, "after", kind)
    assert main_labels(after) == {"X", "W", "A", "B", "bias", "W + s·B·A", "Y = X·(W + s·B·A)ᵀ"}


def test_site_pictures_show_a_folded_and_a_transposed_product_by_role(monkeypatch, tmp_path):
    """Z1 folded into the dX product: the picture shows the product by its role's equation,
    [dY·W | Z1] = dY·[W | s·B], and its two column slices by the blocks that equation names; dB transposed,
    (Z2ᵀ·dY)ᵀ, is still dB by its product record (the shapes either way round)."""
    x = torch.randn(4, 32, 16, requires_grad=True)
    ((module, site, before, after, kind),) = captured_sites(
        monkeypatch, tmp_path, peft_linear(16, 24, 4), x, forward="forward1", backward="backward1",
        forms={"Z1_in_dX": "folded", "dB": "transposed"})
    labels = main_labels(after)
    assert {"[dY·W | Z1] = dY·[W | s·B]", "Z1", "dY·W", "dX = dY·W + Z1·A", "dB = dYᵀ·Z2", "dA = Z1ᵀ·X",
            "Y = base + (X·Aᵀ)·(s·B)ᵀ", "X·Aᵀ"} <= labels, labels
    for text in labels:
        assert not ATEN_NAME.search(text), text


def test_site_picture_roles_are_the_matchers_record(monkeypatch, tmp_path):
    """Under PEFT's lora_dropout the adapter reads drop(X) and the base X, as SiteFacts.dropout says;
    the values the site hands on are the record's Y, dA, dB and dX, before and after."""
    x = torch.randn(4, 32, 16, requires_grad=True)
    ((module, site, before, after, kind),) = captured_sites(monkeypatch, tmp_path, peft_linear(16, 24, 4, dropout=0.1),
                                                            x, forward="forward1", backward="backward1")
    assert set(before.roles.inputs.values()) == {"drop(X)", "X", "A", "B", "W", "bias", "base", "dY"}
    assert {"drop(X)", "dA = Z1ᵀ·drop(X)", "Y = base + s·(drop(X)·Aᵀ)·Bᵀ"} <= main_labels(before)
    assert {"dA = Z1ᵀ·drop(X)", "drop(X)·Aᵀ"} <= main_labels(after)   # forward1 and backward1 share X·Aᵀ
    for picture in (before, after):
        assert sorted(box.result for box in picture.boxes.values() if box.result) == ["Y", "dA", "dB", "dX"]


def test_a_dora_site_picture_names_the_magnitude_and_its_gradient(monkeypatch, tmp_path):
    from peft import LoraConfig, get_peft_model

    from helpers import OneLinear, randomize_adapters

    torch.manual_seed(0)
    model = get_peft_model(OneLinear(16, 24), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True))
    randomize_adapters(model)
    ((module, site, before, after, kind),) = captured_sites(monkeypatch, tmp_path, model,
                                                            torch.randn(4, 32, 16, requires_grad=True))
    assert site.kind == "dora"
    assert {"m", "W′ = W + s·B·A", "mns = m / ‖W′‖", "dm"} <= main_labels(before) | {
        box.result for box in before.boxes.values() if box.result}
    assert "m" in {box.label for box in after.boxes.values() if box.kind == "parameter"}
    assert sorted(box.result for box in after.boxes.values() if box.result) == ["Y", "dA", "dB", "dX", "dm"]


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(16, 24), torch.nn.Linear(24, 16)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_site_picture_names_an_output_gradient_that_is_not_a_tangent(monkeypatch, tmp_path):
    """The first layer's dY is what the second layer's backward computed, not a graph input."""
    from peft import LoraConfig, get_peft_model

    from helpers import randomize_adapters

    torch.manual_seed(0)
    model = get_peft_model(TwoLinears(), LoraConfig(r=4, lora_alpha=8, target_modules=["first", "second"]))
    randomize_adapters(model)
    drawn = captured_sites(monkeypatch, tmp_path, model, torch.randn(4, 32, 16, requires_grad=True),
                           forward="forward2", backward="backward5")
    ((site, before, after),) = [(site, before, after) for module, site, before, after, _ in drawn
                                if module.endswith(".first")]
    assert {"dY", "Z1 = (s·dY)·B", "dX = dY·W + Z1·A"} <= main_labels(before)
    assert {"dY", "Z1 = dY·(s·B)", "dX = dY·(W + s·B·A)"} <= main_labels(after)


@pytest.mark.parametrize("forward,backward", [("forward1", "backward1"), ("forward2", "backward5"),
                                              ("forward1", "backward3")])
def test_pictures_run_left_to_right_in_networkx_layers(monkeypatch, tmp_path, forward, backward):
    x = torch.randn(4, 32, 16, requires_grad=True)
    ((module, site, before, after, kind),) = captured_sites(monkeypatch, tmp_path, peft_linear(16, 24, 4), x,
                                                            forward=forward, backward=backward)
    for picture in (before, after):
        positions = pictures.layout(picture)
        assert positions.keys() == picture.boxes.keys() and len(picture.edges) >= 8
        for u, v in picture.edges:   # every edge runs left to right, one layer or more
            assert positions[u][0] < positions[v][0] - 1e-9, (picture.boxes[u].label, picture.boxes[v].label)
        stems = pictures.draw(picture, tmp_path / f"{forward}_{backward}", stage="after", title="t")
        assert [p.suffix for p in stems] == [".png", ".svg"] and stems[0].read_bytes()[:4] == b"\x89PNG"


# --- debug output never breaks training --------------------------------------------------------------------

NO_MATPLOTLIB = """
sys.modules["matplotlib"] = None   # `import matplotlib` now raises ImportError, as where it is not installed
from torch._dynamo.utils import counters
for seed in (0, 1):   # two graphs, each with a site: one warning all the same
    torch._dynamo.reset()
    model = peft_model()
    torch.compile(model, backend="runlora", options={{"codegen": False, "dump_dir": {folder!r}}})(
        torch.randn(2, 3 + seed, 16)).sum().backward()
print("RESULT", json.dumps(dict(counters["runlora"])))
"""


def test_dump_without_matplotlib_writes_graphs_and_report_and_warns_once(tmp_path):
    proc = run_fresh_python(NO_MATPLOTLIB.format(folder=str(tmp_path)))
    counters = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert counters["sites_rewritten"] == 2 and counters["backward_rewritten"] == 2
    folders = sorted(tmp_path.iterdir())
    assert len(folders) == 2
    for folder in folders:
        assert {p.name for p in folder.iterdir()} == {"joint_before.py", "joint_after.py", "forward.py",
                                                      "backward.py", "report.json"}
    warnings = [l for l in proc.stderr.splitlines() if "site pictures skipped" in l]
    assert len(warnings) == 1 and "matplotlib" in warnings[0], proc.stderr[-2000:]


def test_a_failing_picture_is_logged_and_training_goes_on(monkeypatch, tmp_path, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pictures, "draw", broken)
    model = peft_linear(16, 24, 4)
    x = torch.randn(2, 3, 16, requires_grad=True)
    eager = step(model, x)
    with caplog.at_level(logging.WARNING, logger="lora_rewrite"):
        rewritten = step(torch.compile(model, backend="runlora",
                                       options={"codegen": False, "dump_dir": str(tmp_path)}), x)
    assert_same_step(eager, rewritten, rtol=1e-5)
    assert runlora_counters()["sites_rewritten"] == 1
    (folder,) = list(tmp_path.iterdir())
    assert (folder / "report.json").exists() and not list(folder.glob("*.png"))
    assert any("drawing the pictures of base_model.model.proj failed (RuntimeError: boom)" in r.getMessage()
               for r in caplog.records)


def test_an_unusable_dump_dir_is_logged_and_training_goes_on(tmp_path, caplog):
    not_a_folder = tmp_path / "a_file"
    not_a_folder.write_text("")
    with caplog.at_level(logging.WARNING, logger="lora_rewrite"):
        step(torch.compile(peft_linear(16, 24, 4), backend="runlora",
                           options={"codegen": False, "dump_dir": str(not_a_folder)}),
             torch.randn(2, 3, 16, requires_grad=True))
    assert runlora_counters()["sites_rewritten"] == 1
    assert any(f"writing the dump to {not_a_folder} failed" in r.getMessage() for r in caplog.records)


def test_a_failing_report_publication_is_logged_and_training_goes_on(monkeypatch, caplog):
    from lora_rewrite import debug

    def broken(self):
        raise ValueError("cannot print")

    monkeypatch.setattr(debug.GraphReport, "__str__", broken)
    with caplog.at_level(logging.WARNING, logger="lora_rewrite"):
        step(torch.compile(peft_linear(16, 24, 4), backend="runlora", options={"codegen": False, "debug": True}),
             torch.randn(2, 3, 16, requires_grad=True))
    assert runlora_counters()["sites_rewritten"] == 1
    assert any("publishing the report of graph 0/0 failed (ValueError: cannot print)" in r.getMessage()
               for r in caplog.records)


TRACE_SCRIPT = """
torch.compile(peft_model(), backend="runlora", options={"codegen": False})(torch.randn(2, 3, 16)).sum().backward()
"""


def test_structured_trace_artifacts_for_tlparse(tmp_path):
    run_fresh_python(TRACE_SCRIPT, env={"TORCH_TRACE": str(tmp_path)})
    logs = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    for name in ("runlora_joint_before", "runlora_joint_after", "runlora_report"):
        assert f'"name": "{name}"' in logs
