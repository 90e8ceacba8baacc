"""Product bugs the reliability runs found, pinned by small deterministic tests."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from config.contracts import load_contracts
from config.settings import Settings
from delta_processing.bronze import new_stream_records
from delta_processing.processor import Processor
from landing_zone.layout import LandingLayout
from landing_zone.writer import LandingWriter
from tests.helpers import land_records


def _kafka_rows(offsets: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ts": [f"2026-11-01T00:00:{o:02d}Z" for o in offsets],
            "device_id": ["k"] * len(offsets),
            "sensor": ["s"] * len(offsets),
            "value": [str(o) for o in offsets],
            "kafka_topic": ["t"] * len(offsets),
            "kafka_partition": ["0"] * len(offsets),
            "kafka_offset": [str(o) for o in offsets],
        }
    )


def test_offset_dedup_never_collapses_rows_without_a_kafka_position() -> None:
    """Found by the kill loop: HTTP rows sharing a bronze micro-batch with Kafka rows were
    collapsed into one row (`unique` over null positions), losing acknowledged records."""
    plain = pl.DataFrame({"ts": ["a", "b", "c"], "value": ["1", "2", "3"]})
    batch = pl.concat([plain, _kafka_rows([5, 5, 6]), plain], how="diagonal")
    fresh, positions = new_stream_records(batch, None)
    assert fresh.height == 6 + 2  # both plain copies (not Kafka re-deliveries), offsets 5, 6
    assert positions == {"lakehouse/kafka/t/0": 6}


def test_http_and_kafka_files_in_one_micro_batch_all_reach_silver(
    data_dir: Path, settings: Settings
) -> None:
    rows = [
        {"ts": f"2026-11-02T00:00:{i:02d}Z", "device_id": "h", "sensor": "s", "value": i}
        for i in range(7)
    ]
    land_records(data_dir, "readings", rows)
    LandingWriter(LandingLayout(data_dir)).write_frame("readings", _kafka_rows([0, 1, 2]))
    land_records(data_dir, "readings", rows[:2])  # an exact re-send over HTTP: one key each
    assert Processor(settings, load_contracts()).run_once().failures == []
    bronze = pl.read_delta(str(data_dir / "bronze" / "readings"))
    assert bronze.height == 7 + 3 + 2
    silver = pl.read_delta(str(data_dir / "silver" / "readings"))
    assert silver.height == 7 + 3
