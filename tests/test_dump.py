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


def main_labels(picture, site):
    return {pictures.node_label(n, site.scale)[0] for n in picture.nodes.values()}


ATEN_NAME = re.compile(r"\b(mm|addmm|permute|view|mul|add|reshape|primals|tangents|clone)(_\w*)?\b")


def test_site_pictures_label_roles_not_aten_names(monkeypatch, tmp_path):
    x = torch.randn(4, 32, 16, requires_grad=True)   # N = 128 > o: forward2 and backward5 (forced too)
    ((module, site, before, after, kind),) = captured_sites(monkeypatch, tmp_path, peft_linear(16, 24, 4), x,
                                                            forward="forward2", backward="backward5")
    assert (site.forward, site.backward, kind) == ("forward2", "backward5", "joint")
    as_traced = main_labels(before, site)
    assert {"X", "W", "A", "B", "bias + X·Wᵀ", "dY", "X·Aᵀ", "Z1 = (s·dY)·B", "dA = Z1ᵀ·X", "dB = (s·dYᵀ)·(X·Aᵀ)",
            "Y = bias + X·Wᵀ + s·((X·Aᵀ)·Bᵀ)", "dX = Z1·A + dY·W"} <= as_traced
    rewritten = main_labels(after, site)
    # The scale rides inside the products as alpha: no s·B box, and the beta = 0 addmm's unread first
    # argument (a row of B) is neither drawn nor an edge into dB.
    assert {"X", "W", "A", "B", "bias", "dY", "W′ = W + s·(B·A)", "Y = bias + X·W′ᵀ",
            "Z1 = s·(dY·B)", "dA = Z1ᵀ·X", "dB = s·(dYᵀ·(X·Aᵀ))", "dX = dY·W′"} <= rewritten
    assert "s·B" not in rewritten
    label = {key: pictures.node_label(n, site.scale)[0] for key, n in after.nodes.items()}
    into_grad_b = {label[src] for src, dst in after.edges if label[dst].startswith("dB")}
    assert into_grad_b == {"dY", "X·Aᵀ"}, into_grad_b
    for label in as_traced | rewritten:
        assert not ATEN_NAME.search(label), label
    roles = {n.kind for n in after.nodes.values() if n.kind != "op"}
    assert roles == {"input", "parameter"}
    assert {pictures.render(n.expr) for n in after.nodes.values() if n.kind == "parameter"} == {"W", "A", "B", "bias"}


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
    assert main_labels(after, site) == {"X", "W", "A", "B", "bias", "W′ = W + s·(B·A)", "Y = bias + X·W′ᵀ"}


def test_site_pictures_show_a_folded_and_a_transposed_product_by_role(monkeypatch, tmp_path):
    """Z1 folded into the dX product: the picture shows dY·[W′ | s·B], and its two column slices as
    dX = dY·W′ and Z1; dB transposed, (Z2ᵀ·dY)ᵀ, is still labelled dB."""
    x = torch.randn(4, 32, 16, requires_grad=True)
    ((module, site, before, after, kind),) = captured_sites(
        monkeypatch, tmp_path, peft_linear(16, 24, 4), x, forward="forward2", backward="backward5",
        forms={"Z1_in_dX": "folded", "dB": "transposed"})
    labels = main_labels(after, site)
    assert {"dY·[W′ | s·B]", "Z1 = dY·(s·B)", "dX = dY·W′", "dB = s·(dYᵀ·(X·Aᵀ))", "dA = Z1ᵀ·X"} <= labels
    for label in labels:
        assert not ATEN_NAME.search(label) and "cat_" not in label, label


def test_site_picture_roles_are_the_matchers_record(monkeypatch, tmp_path):
    """Under PEFT's lora_dropout the adapter reads drop(X) and the base X, as SiteFacts.dropout says;
    the values the site hands on are the record's Y, dA, dB and dX, before and after."""
    x = torch.randn(4, 32, 16, requires_grad=True)
    ((module, site, before, after, kind),) = captured_sites(monkeypatch, tmp_path, peft_linear(16, 24, 4, dropout=0.1),
                                                            x, forward="forward1", backward="backward1")
    assert set(before.roles.inputs.values()) == {"drop(X)", "X", "A", "B", "W", "bias", "dY"}
    assert {"drop(X)", "dA = Z1ᵀ·drop(X)", "Y = bias + X·Wᵀ + s·((drop(X)·Aᵀ)·Bᵀ)"} <= main_labels(before, site)
    assert "dA = Z1ᵀ·drop(X)" in main_labels(after, site)
    for picture in (before, after):
        assert sorted(n.result for n in picture.nodes.values() if n.result) == ["Y", "dA", "dB", "dX"]


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
    assert {"dY", "Z1 = (s·dY)·B", "dX = Z1·A + dY·W"} <= main_labels(before, site)
    assert {"dY", "Z1 = s·(dY·B)", "dX = dY·W′"} <= main_labels(after, site)


def _crosses(xs, ys, box, samples=60) -> bool:
    x, y, w, h = box
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        for k in range(samples + 1):
            px, py = x0 + (x1 - x0) * k / samples, y0 + (y1 - y0) * k / samples
            if abs(px - x) < w / 2 - 1e-6 and abs(py - y) < h / 2 - 1e-6:
                return True
    return False


@pytest.mark.parametrize("forward,backward", [("forward1", "backward1"), ("forward2", "backward5"),
                                              ("forward1", "backward3")])
def test_pictures_run_left_to_right_and_no_edge_crosses_a_node(monkeypatch, tmp_path, forward, backward):
    x = torch.randn(4, 32, 16, requires_grad=True)
    ((module, site, before, after, kind),) = captured_sites(monkeypatch, tmp_path, peft_linear(16, 24, 4), x,
                                                            forward=forward, backward=backward)
    for picture in (before, after):
        labels = {k: pictures.node_label(n, site.scale) for k, n in picture.nodes.items()}
        geo = pictures.geometry(picture, labels)
        assert len(geo.edges) == len(picture.edges) >= 8
        for (u, v), (xs, ys) in geo.edges.items():
            assert all(a <= b + 1e-9 for a, b in zip(xs, xs[1:])), (u, v)    # left to right
            for k, box in geo.boxes.items():
                if k not in (u, v):
                    assert not _crosses(xs, ys, box), f"edge {u} → {v} crosses {k}"


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
