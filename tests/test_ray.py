"""treebatch on a real two-node Ray cluster (tests/ray_cluster_check.py, in a loopback-only network
namespace): outputs equal to one process token for token, prefix-aware sharding computes what one
process computes and round-robin more, a replica killed mid-run loses nothing and duplicates
nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
CHECK = Path(__file__).with_name("ray_cluster_check.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip for a loopback-only network namespace")
    work = tmp_path_factory.mktemp("ray")
    out = work / "results.json"
    command = f"ip link set lo up && exec {sys.executable} {CHECK} {out} {work}"
    done = subprocess.run(["unshare", "-n", "sh", "-c", command], capture_output=True, text=True, timeout=900)
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"cannot make a network namespace here: {done.stderr[-300:]}")
    assert done.returncode == 0 and out.exists(), done.stderr[-4000:]
    return json.loads(out.read_text())


def test_two_nodes_on_loopback_each_with_a_replica(results):
    assert results["nodes"] == ["127.0.0.1", "127.0.0.1"]
    assert len(set(results["replica_nodes"])) == 2  # one replica per node


def test_outputs_equal_one_process_token_for_token(results):
    assert results["one"]["status"] == results["prefix"]["status"] == 0
    assert results["prefix"]["texts"] == results["one"]["texts"]
    assert len(results["one"]["texts"]) == 20
    assert all(count > 0 for count in results["prefix"]["per_replica"])  # both replicas worked


def test_prefix_aware_sharding_computes_what_one_process_computes(results):
    assert results["prefix"]["computed"] == results["one"]["computed"]
    assert results["round_robin"]["computed"] > results["prefix"]["computed"]
    assert results["round_robin"]["texts"] == results["one"]["texts"]


def test_a_replica_killed_mid_run_loses_and_duplicates_nothing(results):
    killed = results["killed"]
    assert killed["killed"] and killed["status"] == 0 and killed["replaced"] >= 1
    assert sorted(killed["ids"]) == sorted(results["one"]["texts"])  # each custom_id exactly once
    assert not killed["errors"] and killed["texts"] == results["one"]["texts"]


def test_ray_data_groups_by_prefix_and_answers_every_row_once(results):
    answered = results["ray_data"]
    assert answered["rows"] == 20 and answered["keys"] == 4 + 4  # four documents, four lone prompts
    assert answered["texts"] == results["one"]["texts"]


def test_an_engine_error_on_a_replica_reaches_the_caller_and_the_next_call_runs(results):
    assert results["engine_error"] and "context" in results["engine_error"]
    assert results["after_error"] == results["one"]["texts"]["lone0"]


def test_sigint_on_the_driver_stops_cleanly_and_a_rerun_resumes(results):
    interrupted = results["interrupted"]
    assert interrupted["first"] == 130 and 1 <= interrupted["done_first"] < 20
    assert interrupted["second"] == 0
    assert sorted(interrupted["ids"]) == sorted(results["one"]["texts"])  # each once
    assert interrupted["texts"] == results["one"]["texts"]
