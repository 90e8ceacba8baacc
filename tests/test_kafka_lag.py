"""Consumer lag from librdkafka statistics: known figures only, never a guessed zero."""

from __future__ import annotations

import pytest

from landing_zone.kafka_lag import StatisticsError, parse_statistics, partition_lag


def _stats(**partitions: dict[str, int]) -> dict[str, object]:
    return {"topics": {"t": {"partitions": dict(partitions)}}}


def test_lag_is_end_minus_the_bridges_own_commit() -> None:
    stats = _stats(**{"0": {"ls_offset": 40, "hi_offset": 42, "committed_offset": 10}})
    # read_committed: the last stable offset is the end; our own commit beats the stale one
    assert partition_lag(stats, {("t", 0): 25}, [("t", 0)]) == {("t", 0): 15}
    assert partition_lag(stats, {}, [("t", 0)]) == {("t", 0): 30}


def test_high_watermark_when_no_stable_offset_is_known() -> None:
    stats = _stats(**{"0": {"ls_offset": -1001, "hi_offset": 42, "committed_offset": 2}})
    assert partition_lag(stats, {}, [("t", 0)]) == {("t", 0): 40}


@pytest.mark.parametrize(
    "entry",
    [
        {"ls_offset": -1001, "hi_offset": -1001, "committed_offset": 3},  # no fetch yet
        {"ls_offset": 9, "hi_offset": 9, "committed_offset": -1001},  # group never committed
        {"hi_offset": "9", "committed_offset": 3},  # not a number
        {"ls_offset": True, "committed_offset": 3},  # bool is no offset
    ],
)
def test_unknown_offsets_give_no_figure(entry: dict[str, object]) -> None:
    assert partition_lag({"topics": {"t": {"partitions": {"0": entry}}}}, {}, [("t", 0)]) == {}


def test_only_assigned_partitions_and_never_negative() -> None:
    stats = _stats(
        **{
            "0": {"ls_offset": 5, "committed_offset": 5},
            "1": {"ls_offset": 5, "committed_offset": 0},
            "-1": {"ls_offset": -1001, "committed_offset": -1001},  # librdkafka's UA partition
        }
    )
    # statistics taken before our latest commit: the end trails the commit
    assert partition_lag(stats, {("t", 0): 7}, [("t", 0), ("x", 0)]) == {("t", 0): 0}
    assert partition_lag({"topics": "junk"}, {}, [("t", 0)]) == {}
    assert partition_lag({}, {}, [("t", 0)]) == {}


@pytest.mark.parametrize("text", ["not json", "[1, 2]", ""])
def test_unreadable_statistics_raise_a_clear_error(text: str) -> None:
    with pytest.raises(StatisticsError, match="librdkafka statistics"):
        parse_statistics(text)
