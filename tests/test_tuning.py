"""Measured forms (lora_rewrite/tuning.py): the fastest candidate wins only by a margin, every role a
variant emits is measured on real tensors even under fake mode, and the result is kept on disk for
the next process — two fresh processes on one cache folder: the second measures nothing."""

import json
import time

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import result_line, run_fresh_python
from lora_rewrite import tuning
from lora_rewrite.forms import DIRECT, ORIENTATIONS, ROLE_BY_NAME, TRANSPOSED, Role
from lora_rewrite.variants import BACKWARDS, BY_NAME, FORWARDS, Dims, DxMode

ROLE = Role("test", "C = P·Q", ORIENTATIONS)


def sleeper(seconds):
    return lambda: time.sleep(seconds) or seconds


def test_the_default_form_keeps_its_place_unless_another_is_clearly_faster():
    ops = tuning.MeasuringOps(torch.device("cpu"), repeats=3)
    assert ops.pick(ROLE, {DIRECT: sleeper(0.02), TRANSPOSED: sleeper(0.002)}) == 0.002
    assert ops.forms == {"test": TRANSPOSED}
    assert ops.seconds["test"][DIRECT] > ops.seconds["test"][TRANSPOSED] > 0

    ops = tuning.MeasuringOps(torch.device("cpu"), repeats=3)
    ops.pick(ROLE, {DIRECT: sleeper(0.01), TRANSPOSED: sleeper(0.0099)})   # 1 % faster: noise
    assert ops.forms == {"test": DIRECT}


def test_a_long_call_is_timed_twice_in_all_and_a_short_one_after_a_warm_up():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(tuning.LONG_CALL_S * 1.2)
        return len(calls)

    seconds, result = tuning.time_call(slow, torch.device("cpu"), repeats=5)
    assert len(calls) == 2 and result == 2 and seconds >= tuning.LONG_CALL_S
    calls.clear()
    seconds, result = tuning.time_call(lambda: calls.append(1) or len(calls), torch.device("cpu"), repeats=5)
    assert len(calls) == 6 and result == 6


def test_the_chosen_candidate_is_not_run_again_after_its_timing():
    calls = {DIRECT: 0, TRANSPOSED: 0}

    def counted(form, seconds):
        def run():
            calls[form] += 1
            time.sleep(seconds)
            return form
        return run

    ops = tuning.MeasuringOps(torch.device("cpu"), repeats=3)
    assert ops.pick(ROLE, {DIRECT: counted(DIRECT, 0.01), TRANSPOSED: counted(TRANSPOSED, 0.001)}) == TRANSPOSED
    assert calls == {DIRECT: 4, TRANSPOSED: 4}   # a warm-up and 3 timed calls each, nothing more


def test_a_stage_with_nothing_to_choose_is_not_run(tmp_path, monkeypatch):
    """forward2 has no product with a choice: measuring its forms costs no compile time."""
    monkeypatch.setattr(tuning, "CACHE", tuning.FormCache(tmp_path))
    tuning._measure_stage.cache_clear()

    def fail(*args, **kwargs):
        raise AssertionError("a stage with nothing to choose was timed")

    monkeypatch.setattr(tuning, "time_call", fail)
    m = tuning.measure_stage(BY_NAME["forward2"], _shape(BY_NAME["forward2"], N=4096, i=1024, o=1024),
                             torch.device("cpu"))
    assert m.forms == {} and m.candidates == {} and m.seconds == 0


def _shape(variant, N=64, i=32, o=48, r=4, dx=DxMode.TOTAL, conv1d=False):
    return tuning.stage_shape(variant, Dims(N, i, o, r), dx, torch.float32, conv1d)


# The roles each variant emits with a choice, with dX (DxMode.TOTAL).
ROLES_OF = {"forward1": {"XA"}, "forward2": set(), "backward1": {"Z1", "Z1_in_dX", "Z2", "dA", "dB"},
            "backward2": {"Z1", "Z1_in_dX", "Zt", "dA"}, "backward3": {"Zt", "Z1", "Z1_in_dX"},
            "backward4": {"Zt"}, "backward5": {"Z1", "Z1_in_dX", "Z2", "dA", "dB"}}


@pytest.mark.parametrize("variant", FORWARDS + BACKWARDS, ids=lambda v: v.name)
def test_every_role_a_variant_emits_is_measured_on_real_tensors(variant, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "CACHE", tuning.FormCache(tmp_path))
    tuning._measure_stage.cache_clear()
    with FakeTensorMode():  # as inside the compiler
        m = tuning.measure_stage(variant, _shape(variant), torch.device("cpu"))
    assert set(m.candidates) == ROLES_OF[variant.name]
    assert set(m.forms) == ROLES_OF[variant.name]
    for role, times in m.candidates.items():
        assert set(times) == set(BY_ROLE[role]) and all(t > 0 for t in times.values())
        assert m.forms[role] in times
    assert m.seconds == 0 and not m.from_disk    # the whole stage is timed only for the "time" criterion
    with FakeTensorMode():
        timed = tuning.measure_stage(variant, _shape(variant), torch.device("cpu"), stage_time=True)
    assert timed.seconds > 0 and timed.forms == m.forms and timed.candidates == m.candidates


BY_ROLE = {name: role.forms for name, role in ROLE_BY_NAME.items()}


def test_measurements_are_kept_per_process_and_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "CACHE", tuning.FormCache(tmp_path))
    tuning._measure_stage.cache_clear()
    variant, cpu = BY_NAME["backward1"], torch.device("cpu")
    first = tuning.measure_stage(variant, _shape(variant), cpu)
    assert tuning.measure_stage(variant, _shape(variant), cpu) is first      # the process keeps it
    assert tuning._measure_stage.cache_info().misses == 1
    stored = json.loads((tmp_path / tuning.CACHE_FILE).read_text())
    (key,) = stored
    assert json.loads(key)[2] == torch.__version__ and "threads" in json.loads(key)[1]
    assert stored[key]["forms"] == first.forms

    # Another shape and another layout are measured apart; the file holds both.
    tuning.measure_stage(variant, _shape(variant, conv1d=True), cpu)
    assert len(json.loads((tmp_path / tuning.CACHE_FILE).read_text())) == 2

    # A new process (here: a fresh cache object and a cleared process cache) reads it back.
    monkeypatch.setattr(tuning, "CACHE", tuning.FormCache(tmp_path))
    tuning._measure_stage.cache_clear()
    again = tuning.measure_stage(variant, _shape(variant), cpu)
    assert again.from_disk and again.forms == first.forms and again.candidates == first.candidates


def test_a_damaged_cache_file_is_measured_over(tmp_path, monkeypatch):
    (tmp_path / tuning.CACHE_FILE).write_text("{not json")
    monkeypatch.setattr(tuning, "CACHE", tuning.FormCache(tmp_path))
    tuning._measure_stage.cache_clear()
    m = tuning.measure_stage(BY_NAME["forward1"], _shape(BY_NAME["forward1"]), torch.device("cpu"))
    assert not m.from_disk
    assert len(json.loads((tmp_path / tuning.CACHE_FILE).read_text())) == 1


TWO_PROCESSES = """
from lora_rewrite import explain
model = peft_model()
report = explain(model, torch.randn(4, 32, 16, requires_grad=True), options={"codegen": False})
(graph,) = report.graphs
(site,) = graph.sites
print("RESULT", json.dumps({"forms": site.forms, "source": site.forms_source, "seconds": site.form_seconds,
                            "text": str(report)}))
"""


def test_a_second_process_on_the_same_cache_folder_measures_nothing(tmp_path):
    env = {"RUNLORA_CACHE_DIR": str(tmp_path)}
    first = result_line(run_fresh_python(TWO_PROCESSES, env=env))
    second = result_line(run_fresh_python(TWO_PROCESSES, env=env))
    assert first["source"] == "measured" and second["source"] == "measured (kept on disk)"
    assert second["forms"] == first["forms"] and second["seconds"] == first["seconds"]
    assert set(first["forms"]) >= {"dA", "dB", "Z1_in_dX"}
    assert "forms" in first["text"] and "ms*" in first["text"]   # explain prints every candidate's time
