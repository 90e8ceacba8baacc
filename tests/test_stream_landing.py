"""What the bridges rely on downstream: Kafka re-deliveries de-duplicated in bronze,
dead letters promoted to ``quarantine/_dead_letters``."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl

from analytics import connect
from config.contracts import load_contracts
from config.settings import Settings
from delta_processing.bronze import stream_app_id
from delta_processing.processor import Processor
from delta_processing.tables import TableStore
from landing_zone.layout import LandingLayout
from landing_zone.writer import LandingWriter


def _kafka_batch(
    offsets: list[int], partition: int = 0, topic_id: str | None = None, sensor: str = "t"
) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "ts": [f"2026-11-20T10:{o % 60:02d}:00Z" for o in offsets],
            "device_id": [f"p{partition}d{o}" for o in offsets],
            "sensor": [sensor] * len(offsets),
            "value": [str(o) for o in offsets],
            "kafka_topic": ["sensors"] * len(offsets),
            "kafka_partition": [str(partition)] * len(offsets),
            "kafka_offset": [str(o) for o in offsets],
        }
    )
    if topic_id is None:  # landed by a bridge that did not stamp topic ids
        return frame
    return frame.with_columns(pl.lit(topic_id).alias("kafka_topic_id"))


def test_redelivered_kafka_messages_never_make_a_second_bronze_row(settings: Settings) -> None:
    writer = LandingWriter(LandingLayout(settings.data_dir))
    processor = Processor(settings, load_contracts())
    writer.write_frame("readings", _kafka_batch([0, 1, 2, 3]))
    writer.write_frame("readings", _kafka_batch([2, 3, 4]))  # re-delivered after a crash
    writer.write_frame("readings", _kafka_batch([0, 1], partition=1))
    processor.run_once()
    writer.write_frame("readings", _kafka_batch([3, 4, 5]))  # again, in a later batch
    processor.run_once()

    bronze = pl.read_delta(str(settings.data_dir / "bronze" / "readings"))
    keys = bronze.select("kafka_partition", "kafka_offset").sort("kafka_partition", "kafka_offset")
    assert keys.rows() == [("0", str(o)) for o in range(6)] + [("1", "0"), ("1", "1")]
    table = TableStore(settings.data_dir).open("bronze", "readings")
    assert table is not None
    assert table.transaction_version(stream_app_id("sensors", "0")) == 5
    assert table.transaction_version(stream_app_id("sensors", "1")) == 1
    assert pl.read_delta(str(settings.data_dir / "silver" / "readings")).height == 8


def test_dead_letters_reach_their_delta_table_once(settings: Settings) -> None:
    writer = LandingWriter(LandingLayout(settings.data_dir))
    letters = pl.DataFrame(
        {
            "origin": ["mqtt", "kafka"],
            "topic": ["tele/f2-zz/x/y/z", "sensors"],
            "payload_base64": ["e2JhZA==", "/w=="],
            "error": ["invalid MAC 'zz'", "invalid UTF-8 at byte 0"],
            "received_at": [datetime(2026, 11, 20, tzinfo=UTC).isoformat()] * 2,
        }
    )
    writer.write_dead_letters(letters)
    processor = Processor(settings, load_contracts())
    processor.run_once()
    processor.run_once()
    table = pl.read_delta(str(settings.data_dir / "quarantine" / "_dead_letters"))
    assert sorted(table["error"].to_list()) == ["invalid MAC 'zz'", "invalid UTF-8 at byte 0"]
    assert not list((settings.data_dir / "landing" / ".dead_letters").glob("*.parquet"))
    rows = (
        connect(settings.data_dir)
        .sql("SELECT origin, payload_base64 FROM quarantine._dead_letters ORDER BY origin")
        .fetchall()
    )
    assert rows == [("kafka", "/w=="), ("mqtt", "e2JhZA==")]


def test_a_topic_created_again_is_kept_apart_by_its_topic_id(settings: Settings) -> None:
    """Offsets of a topic deleted and created again start at 0: held positions of the
    old topic must not drop them; re-deliveries of either incarnation still are."""
    writer = LandingWriter(LandingLayout(settings.data_dir))
    processor = Processor(settings, load_contracts())
    writer.write_frame("readings", _kafka_batch([0, 1, 2, 3], sensor="legacy"))  # no ids yet
    writer.write_frame("readings", _kafka_batch([4, 5, 6], topic_id="old", sensor="old"))
    processor.run_once()
    writer.write_frame("readings", _kafka_batch([5, 6], topic_id="old", sensor="old"))  # again
    writer.write_frame("readings", _kafka_batch([0, 1, 2], topic_id="new", sensor="new"))
    processor.run_once()
    writer.write_frame("readings", _kafka_batch([1, 2, 3], topic_id="new", sensor="new"))
    writer.write_frame("readings", _kafka_batch([2, 3], sensor="legacy"))  # a late legacy one
    processor.run_once()

    bronze = pl.read_delta(str(settings.data_dir / "bronze" / "readings"))
    kept = sorted(bronze.select("sensor", pl.col("kafka_offset").cast(pl.Int64)).rows())
    assert kept == (
        [("legacy", o) for o in range(4)]
        + [("new", o) for o in range(4)]
        + [("old", o) for o in (4, 5, 6)]
    )
    table = TableStore(settings.data_dir).open("bronze", "readings")
    assert table is not None
    assert table.transaction_version(stream_app_id("sensors", "0")) == 3
    assert table.transaction_version(stream_app_id("sensors", "0", "old")) == 6
    assert table.transaction_version(stream_app_id("sensors", "0", "new")) == 3
