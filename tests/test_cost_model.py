"""Cost model sanity: sharing predicts less time than no sharing, and more work costs more."""

from __future__ import annotations

from treebatch.core.calibration_table import CalibrationTable
from treebatch.core.cost_model import predict_batch_time

TABLE = CalibrationTable({16: 0.02, 64: 0.03, 256: 0.08, 1024: 0.3}, 2e-8, 256)
SYSTEM = list(range(1000, 1400))
SHARED = [SYSTEM + list(range(2000 + 50 * i, 2030 + 50 * i)) for i in range(24)]
DISTINCT = [list(range(10000 + 500 * i, 10000 + 500 * i + 60 + 7 * i)) for i in range(24)]


def test_sharing_predicts_less_time_than_no_sharing():
    shared = predict_batch_time(SHARED, 16, TABLE)
    assert shared["predicted_seconds"] < 0.5 * shared["predicted_seconds_no_sharing"]
    assert shared["prefill_tokens"] == 400 + 24 * 30 and shared["prefill_tokens_no_sharing"] == 24 * 430
    distinct = predict_batch_time(DISTINCT, 16, TABLE)  # nothing to share: both the same
    assert distinct["predicted_seconds"] == distinct["predicted_seconds_no_sharing"]


def test_prediction_grows_with_tokens():
    seconds = [predict_batch_time(SHARED, n, TABLE)["predicted_seconds"] for n in (1, 4, 16, 64)]
    assert seconds == sorted(seconds) and seconds[0] < seconds[-1]
    longer = [p + list(range(30000, 30000 + extra)) for p, extra in zip(DISTINCT, [0] * 12 + [200] * 12)]
    assert predict_batch_time(longer, 16, TABLE)["predicted_seconds"] > predict_batch_time(DISTINCT, 16, TABLE)["predicted_seconds"]
    more = predict_batch_time(DISTINCT * 2, 16, TABLE)["predicted_seconds"]
    assert more > predict_batch_time(DISTINCT, 16, TABLE)["predicted_seconds"]


def test_step_count_matches_the_schedule_by_hand():
    # One 100-token prompt, budget 256: one prefill step (samples token 1), then 9 decode steps.
    result = predict_batch_time([list(range(100))], 10, TABLE)
    assert result["num_steps"] == 10
    expected = TABLE.forward_time(100) + sum(TABLE.step_time(1, 101 + j) for j in range(9))
    assert abs(result["predicted_seconds"] - expected) < 1e-3


def test_kv_limit_and_dict_calibration():
    tight = predict_batch_time(DISTINCT, 32, TABLE.to_dict(), num_kv_blocks=12, block_size=16)
    loose = predict_batch_time(DISTINCT, 32, TABLE.to_dict())
    assert tight["predicted_seconds"] > loose["predicted_seconds"]
    assert tight["num_steps"] > loose["num_steps"]


def test_shared_prefix_attention_reads_the_prefix_once_per_group():
    table = CalibrationTable({16: 0.02, 64: 0.03, 256: 0.08, 1024: 0.3}, 1e-5, 256)
    once = predict_batch_time(SHARED, 32, table)["predicted_seconds"]
    per_member = predict_batch_time(SHARED, 32, table, cascade_min_queries=None)["predicted_seconds"]
    assert once < per_member
