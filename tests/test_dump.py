"""The dump directory and the structured-trace artifacts."""

import json

import torch

from helpers import peft_linear, run_fresh_python


def test_dump_dir_holds_graphs_report_and_pictures(tmp_path):
    model = peft_linear(16, 24, 4)
    compiled = torch.compile(model, backend="runlora", options={"codegen": False, "dump_dir": str(tmp_path)})
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
    y.sum().backward()


def test_dump_of_an_inference_graph(tmp_path):
    model = peft_linear(16, 24, 4).eval()
    with torch.no_grad():
        torch.compile(model, backend="runlora", options={"codegen": False, "dump_dir": str(tmp_path)})(torch.randn(4, 16))
    (folder,) = list(tmp_path.iterdir())
    assert {"joint_before.py", "joint_after.py", "inference.py", "report.json"} <= {p.name for p in folder.iterdir()}


TRACE_SCRIPT = """
torch.compile(peft_model(), backend="runlora", options={"codegen": False})(torch.randn(2, 3, 16)).sum().backward()
"""


def test_structured_trace_artifacts_for_tlparse(tmp_path):
    run_fresh_python(TRACE_SCRIPT, env={"TORCH_TRACE": str(tmp_path)})
    logs = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    for name in ("runlora_joint_before", "runlora_joint_after", "runlora_report"):
        assert f'"name": "{name}"' in logs
