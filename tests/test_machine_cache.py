"""Stored machine measurements: reused while the machine is as fast as when they were taken,
measured again when they were taken under load."""

from __future__ import annotations

import json

from treebatch.runtime import machine_cache


def test_a_measurement_taken_under_load_is_taken_again(monkeypatch, tmp_path):
    monkeypatch.setenv("TREEBATCH_CACHE", str(tmp_path))
    measured = []

    def measure():
        measured.append(1)
        return {"answer": len(measured)}

    monkeypatch.setattr(machine_cache, "pace", lambda: 3.0)  # around the measurement: busy
    monkeypatch.setattr(machine_cache, "pace_now", lambda: 2.5)
    assert machine_cache.cached("probe", {"k": 1}, measure) == {"answer": 1}
    stored = json.loads(next((tmp_path / "calibration").glob("probe-*.json")).read_text())
    assert stored["pace"] == 3.0
    assert machine_cache.cached("probe", {"k": 1}, measure) == {"answer": 1}  # as busy now: reused
    monkeypatch.setattr(machine_cache, "pace", lambda: 1.0)
    monkeypatch.setattr(machine_cache, "pace_now", lambda: 1.0)  # quiet now: 3.0 > 1.3 x 1.0
    assert machine_cache.cached("probe", {"k": 1}, measure) == {"answer": 2}
    assert machine_cache.cached("probe", {"k": 1}, measure) == {"answer": 2}  # and the new one kept
    assert len(measured) == 2


def test_under_load_means_slower_than_now_by_the_factor():
    assert machine_cache.measured_under_load(None, lambda: 1.0)  # stored before paces were kept
    assert not machine_cache.measured_under_load(1.29, lambda: 1.0)
    assert machine_cache.measured_under_load(1.31, lambda: 1.0)
    assert not machine_cache.measured_under_load(1.0, lambda: 2.0)  # busier now than then: keep it


def test_pace_is_measured_and_reused_within_a_start(monkeypatch):
    assert machine_cache.pace(repeats=3) > 0
    calls = []
    monkeypatch.setattr(machine_cache, "_pace_now", [])
    monkeypatch.setattr(machine_cache, "pace", lambda: calls.append(1) or 0.004)
    assert machine_cache.pace_now() == machine_cache.pace_now() == 0.004 and len(calls) == 1
