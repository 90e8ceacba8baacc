"""The MQTT bridge's redelivery journal (landing_zone/mqtt_journal.py) and what it protects.

A QoS 1 message landed but not yet acknowledged (bridge killed after the landing file,
or its connection cut while the batch was written) comes back with DUP set. Readings
without a timestamp are stamped with the receive time, so landing the copy again would
make a second reading in silver. Unit tests cover the journal itself (round trip, atomic
rewrite, bound, damaged files); the others run real mosquitto brokers and bridge
processes killed at exact points (``LAKEHOUSE_CRASH_AT=mqtt_*``).
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from pathlib import Path

import polars as pl
import pytest
from structlog.testing import capture_logs

from config.contracts import load_contracts
from config.crash_hook import CrashHook
from config.settings import Settings
from delta_processing.crashpoints import CrashPoints
from delta_processing.processor import Processor
from landing_zone import mqtt_journal
from landing_zone.layout import DEAD_LETTERS, LandingLayout
from landing_zone.mqtt_batch import Received
from landing_zone.mqtt_bridge import CRASH_POINTS, MqttBridge, MqttBridgeConfig
from landing_zone.mqtt_journal import (
    DIGEST_SIZE,
    MAGIC,
    JournalWriteError,
    LandingRef,
    ReceiveWindow,
    RedeliveryJournal,
    journal_path,
    message_digest,
)
from landing_zone.writer import LandingReceipt, LandingWriter
from tests.helpers import wait_until
from tests.mqtt_broker import MOSQUITTO, MosquittoBroker
from tests.test_mqtt_bridge import (
    bridge_config,
    dead_letters,
    landed,
    landed_values,
    publish,
    running_bridge,
    start_bridge_process,
    wait_logged,
    writer_for,
)

needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

R = 10  # the receive window (Receive Maximum) of the unit tests
SOURCE = LandingRef("readings", "20261101T100000000000Z-000000000001")
LETTERS = LandingRef(DEAD_LETTERS, "20261101T100000000000Z-000000000002")


def untimed(i: int) -> tuple[str, bytes]:
    """Reading ``i`` without a timestamp (a bare number): its own device, value ``i``."""
    return f"tele/f2-AA:BB:CC:00:{i // 256:02X}:{i % 256:02X}/live/c1/temp", str(i).encode()


POISON = [("tele/no-mac/live/c1/temp", f"p{i}".encode()) for i in range(3)]  # dead letters


def message(i: int, mid: int | None = None) -> Received:
    topic, payload = untimed(i)
    return (i + 1 if mid is None else mid, 1, topic.encode(), payload, 0.0)


def window(received: int, connection: int = 0, start: int = 0) -> ReceiveWindow:
    return ReceiveWindow(connection, start, received)


def open_journal(path: Path, durable: set[LandingRef] | None = None) -> RedeliveryJournal:
    """The journal at ``path``; ``durable``: the landing files that exist (default: all)."""
    return RedeliveryJournal.open(path, R, lambda ref: durable is None or ref in durable)


def record(
    journal: RedeliveryJournal,
    files: list[tuple[LandingRef, list[Received]]],
    seen: int,
    connection: int = 0,
    received: int | None = None,
) -> None:
    journal.record(
        files,
        connection=connection,
        seen=seen,
        window=window(seen if received is None else received, connection),
        epoch=journal.epoch,
    )


def live_after(journal: RedeliveryJournal, at: ReceiveWindow) -> int:
    """How many batch records are still live at ``at`` (looking nothing up)."""
    journal.known([], [], connection=-9, seen=0, window=at)
    return journal.batches


def known(
    journal: RedeliveryJournal, messages: list[Received], received: int, connection: int = 0
) -> list[int]:
    """Positions of ``messages`` (all arrived with DUP) the journal knows as landed."""
    return journal.known(
        messages,
        range(len(messages)),
        connection=connection,
        seen=received,
        window=window(received, connection),
    )


# -- the journal ----------------------------------------------------------------------


def test_round_trip_keeps_identities_files_and_what_was_landed(tmp_path: Path) -> None:
    path = tmp_path / "j.journal"
    journal = open_journal(path)
    batch = [message(i) for i in range(4)]
    record(journal, [(SOURCE, batch[:3]), (LETTERS, batch[3:])], seen=4)
    assert known(journal, batch, 4) == []  # recorded ahead of the files: nothing landed yet
    journal.mark_written(SOURCE)
    journal.mark_written(LETTERS)
    assert known(journal, batch, 4) == [0, 1, 2, 3]

    again = open_journal(path)  # a restart: the files exist
    assert again.batches == 1 and again.entries == 4
    assert known(again, batch, 0, connection=1) == [0, 1, 2, 3]
    # Same packet id, other content: another message, which must land.
    assert known(again, [message(7, mid=1), message(0, mid=9)], 0, connection=1) == []
    assert message_digest(b"a/b", b"c") != message_digest(b"a/", b"bc")
    assert len(message_digest(b"t", b"p")) == DIGEST_SIZE


def test_a_batch_whose_files_never_became_durable_is_not_landed(tmp_path: Path) -> None:
    path = tmp_path / "j.journal"
    journal = open_journal(path)
    batch = [message(i) for i in range(3)]
    record(journal, [(SOURCE, batch), (LETTERS, [])], seen=3)  # killed before the files
    assert known(journal, batch, 3) == []
    assert open_journal(path, durable=set()).batches == 0  # dropped on load


def test_the_dead_letter_file_vouches_for_an_unwritable_source(tmp_path: Path) -> None:
    # Written last, the dead-letter file exists only if every source file of the batch was
    # written or (unwritable) dead-lettered into it: its messages are landed either way.
    path = tmp_path / "j.journal"
    batch = [message(i) for i in range(3)]
    record(open_journal(path), [(SOURCE, batch[:2]), (LETTERS, batch[2:])], seen=3)
    assert known(open_journal(path, durable={LETTERS}), batch, 0, 1) == [0, 1, 2]
    assert known(open_journal(path, durable={SOURCE}), batch, 0, 1) == [0, 1]


def test_records_live_for_a_receive_window_then_go(tmp_path: Path) -> None:
    journal = open_journal(tmp_path / "j.journal")
    first = [message(i) for i in range(3)]
    record(journal, [(SOURCE, first), (LETTERS, [])], seen=3)
    journal.mark_written(SOURCE)
    # Fewer than R messages since: the broker may not have read the PUBACKs yet.
    assert live_after(journal, window(3 + R - 1)) == 1
    # R messages later it has read them (it never has more than R unacknowledged out).
    assert live_after(journal, window(3 + R)) == 0
    assert known(journal, first, 3 + R) == []


def test_a_recognised_copy_keeps_its_record_for_another_window(tmp_path: Path) -> None:
    journal = open_journal(tmp_path / "j.journal")
    batch = [message(i) for i in range(3)]
    record(journal, [(SOURCE, batch), (LETTERS, [])], seen=3)
    journal.mark_written(SOURCE)
    # The copy arrives on the next connection (accepted at 3), 5 messages into it: its
    # PUBACK may be lost as well, so the record must outlive it by R, not just by the R
    # messages since the connection began.
    arrived = ReceiveWindow(1, 3, 3 + 5)
    assert journal.known(batch, [0], connection=1, seen=arrived.received, window=arrived) == [0]
    assert live_after(journal, ReceiveWindow(1, 3, 3 + 5 + R - 1)) == 1
    assert live_after(journal, ReceiveWindow(1, 3, 3 + 5 + R)) == 0


def test_records_of_an_earlier_connection_wait_for_the_resends(tmp_path: Path) -> None:
    journal = open_journal(tmp_path / "j.journal")
    batch = [message(i) for i in range(3)]
    record(journal, [(SOURCE, batch), (LETTERS, [])], seen=3)
    journal.mark_written(SOURCE)
    # The connection dropped right after it; on the next one (accepted at 3) the broker
    # resends what it holds first: until R messages arrived on it, any may be a copy.
    assert live_after(journal, ReceiveWindow(1, 3, 3 + R - 1)) == 1
    early = ReceiveWindow(1, 3, 3 + R - 1)
    assert journal.known(batch, [1], connection=1, seen=early.received, window=early) == [1]
    # A later connection: what the broker still held came back within its first R.
    assert live_after(journal, ReceiveWindow(2, 40, 40 + R - 1)) == 1
    assert live_after(journal, ReceiveWindow(2, 40, 40 + R)) == 0


def test_the_file_stays_bounded_over_many_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mqtt_journal, "MIN_REWRITE_BYTES", 1024)  # rewrite soon
    journal = open_journal(tmp_path / "j.journal")
    rewrites = 0
    seen = 0
    sizes = []
    for n in range(300):
        batch = [message(i, mid=(seen + i) % 65535 + 1) for i in range(5)]
        seen += len(batch)
        ref = LandingRef("readings", f"20261101T100000000000Z-{n:012x}")
        record(journal, [(ref, batch), (LETTERS, [])], seen=seen)
        journal.mark_written(ref)
        rewrites += bool(sizes) and journal.file_size < sizes[-1]
        sizes.append(journal.file_size)
        assert journal.entries <= R + len(batch)  # only what may still come back
    assert max(sizes) <= 1024 + 300 and rewrites > 20
    assert (tmp_path / "j.journal").stat().st_size == journal.file_size
    assert open_journal(tmp_path / "j.journal").entries <= R + 5


def test_a_failed_rewrite_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "meta" / "j.journal"  # the directories are created on first write
    journal = open_journal(path)
    first = [message(i) for i in range(3)]
    record(journal, [(SOURCE, first), (LETTERS, [])], seen=3)
    before = path.read_bytes()
    assert before.startswith(MAGIC)

    def no_rename(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    journal._rewrite_due = True  # e.g. after a failed append
    with pytest.raises(JournalWriteError, match="No space left"):
        record(journal, [(LETTERS, [message(9)])], seen=4)
    monkeypatch.undo()
    assert path.read_bytes() == before  # atomic: the old journal, whole
    assert [p.name for p in path.parent.iterdir()] == ["j.journal"]  # no temp file left
    assert journal.batches == 1  # the failed batch was not kept
    record(journal, [(LETTERS, [message(9)])], seen=4)  # the disk has room again
    assert open_journal(path).batches == 2


@pytest.mark.parametrize(
    "damage",
    ["torn_record", "truncated_header", "flipped_byte", "garbage", "no_magic", "empty"],
)
def test_a_damaged_journal_loses_only_its_damaged_part(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "j.journal"
    journal = open_journal(path)
    batches = [[message(i) for i in range(k * 3, k * 3 + 3)] for k in range(3)]
    for k, batch in enumerate(batches):
        record(journal, [(SOURCE, batch), (LETTERS, [])], seen=3 * k + 3)
    data = path.read_bytes()
    last = data.rindex(b"BTCH")
    damaged = {
        "torn_record": data[:-7],  # a kill during the last append
        "truncated_header": data[: last + 5],
        "flipped_byte": data[:-20] + bytes([data[-20] ^ 0xFF]) + data[-19:],
        "garbage": data + b"\x00" * 37,
        "no_magic": b"XX" + data[2:],
        "empty": b"",
    }[damage]
    path.write_bytes(damaged)
    with capture_logs() as logs:
        loaded = open_journal(path)
    survivors = {"no_magic": 0, "empty": 0, "garbage": 3}.get(damage, 2)
    assert loaded.batches == survivors
    every = [m for batch in batches for m in batch]
    hits = known(loaded, every, 0, connection=1)
    assert hits == list(range(3 * survivors))  # never more than was intact
    warned = [e for e in logs if e["event"] == "mqtt.journal_tail_ignored"]
    assert bool(warned) == (damage != "empty")
    # The next record rewrites the file clean first, so it is not hidden behind the damage.
    record(loaded, [(LETTERS, [message(50)])], seen=1, connection=1)
    assert open_journal(path).batches == survivors + 1


def test_reset_forgets_durably_and_refuses_batches_of_the_lost_session(tmp_path: Path) -> None:
    path = tmp_path / "j.journal"
    journal = open_journal(path)
    epoch = journal.epoch
    batch = [message(i) for i in range(3)]
    record(journal, [(SOURCE, batch), (LETTERS, [])], seen=3)
    assert journal.reset() is True
    assert path.read_bytes() == MAGIC and journal.batches == 0
    journal.record(
        [(SOURCE, batch), (LETTERS, [])], connection=0, seen=3, window=window(3), epoch=epoch
    )
    assert journal.batches == 0 and path.read_bytes() == MAGIC  # its session is gone
    assert open_journal(tmp_path / "none.journal").reset() is False  # nothing: no write
    assert not (tmp_path / "none.journal").exists()


@pytest.mark.parametrize(
    "client_id", ["lakehouse-mqtt-bridge", "../../etc/passwd", ".hidden", "a/b\\c:d", "é" * 300]
)
def test_the_journal_file_name_is_safe_for_any_client_id(tmp_path: Path, client_id: str) -> None:
    path = journal_path(tmp_path, "broker", 1883, client_id)
    assert path.parent == tmp_path / "_meta" / "mqtt"
    assert not path.name.startswith(".") and "/" not in path.name and "\\" not in path.name
    assert len(path.name.encode()) <= 100
    # A session is a client id on a broker: another broker, another journal.
    assert journal_path(tmp_path, "broker", 8883, client_id) != path
    assert journal_path(tmp_path, "broker", 1883, client_id + "x") != path


def test_crash_hook_knows_its_points_and_ignores_other_components() -> None:
    assert not CrashHook(None, "mqtt_", CRASH_POINTS).armed
    assert not CrashHook("after_bronze_commit", "mqtt_", CRASH_POINTS).armed  # the processor's
    assert CrashHook("mqtt_after_landing:2", "mqtt_", CRASH_POINTS).armed
    with pytest.raises(ValueError, match="unknown crash point 'mqtt_after_lunch'"):
        CrashHook("mqtt_after_lunch", "mqtt_", CRASH_POINTS)
    with pytest.raises(ValueError, match="at least 1"):
        CrashHook("mqtt_after_landing:0", "mqtt_", CRASH_POINTS)
    # The processor's hook (lakehouse up runs both): the bridge's points are not its own.
    assert not CrashPoints("mqtt_after_landing").armed
    assert CrashPoints("after_claim:2").armed
    with pytest.raises(ValueError, match="unknown crash point 'after_lunch'"):
        CrashPoints("after_lunch")


# -- the bridge's landing thread, without a broker --------------------------------------


def bridge_for(data_dir: Path) -> MqttBridge:
    return MqttBridge(MqttBridgeConfig(), writer_for(data_dir), LandingLayout(data_dir))


def files_of(data_dir: Path, source: str = "readings") -> int:
    return len(list(LandingLayout(data_dir).source_dir(source).glob("*.parquet")))


def test_a_copy_of_a_landed_message_is_acknowledged_not_landed(data_dir: Path) -> None:
    bridge = bridge_for(data_dir)
    batch = [message(i) for i in range(3)] + [(9, 1, POISON[0][0].encode(), POISON[0][1], 0.0)]
    assert bridge._land(batch, connection=0, seen=4)
    assert bridge.records_landed == 3 and bridge.dead_letters == 1
    bridge._discard_pending("connection lost")  # its PUBACKs never went out
    assert bridge._land(batch, bridge._connection, redelivered=[0, 1, 2, 3], seen=8)
    assert bridge.skipped_redeliveries == 4
    assert bridge.records_landed == 3 and bridge.dead_letters == 1  # no second dead letter
    assert files_of(data_dir) == 1 and files_of(data_dir, DEAD_LETTERS) == 1


def test_a_new_message_reusing_a_landed_packet_id_lands(data_dir: Path) -> None:
    bridge = bridge_for(data_dir)
    batch = [message(i) for i in range(3)]
    assert bridge._land(batch, connection=0, seen=3)
    # Without DUP a message is new, whatever its packet id and content (ids are reused).
    assert bridge._land(batch, connection=0, redelivered=(), seen=6)
    assert bridge.records_landed == 6 and bridge.skipped_redeliveries == 0


def test_a_copy_the_journal_does_not_hold_lands(data_dir: Path) -> None:
    bridge = bridge_for(data_dir)
    assert bridge._land([message(0)], connection=0, seen=1)
    bridge._discard_pending("connection lost")
    other = [message(5, mid=1), message(6, mid=2)]  # mid 1 landed, with other content
    assert bridge._land(other, bridge._connection, redelivered=[0, 1], seen=3)
    assert bridge.records_landed == 3 and bridge.skipped_redeliveries == 0


# -- real broker, real kills -------------------------------------------------------------


UNTIMED = 40


@needs_mosquitto
@pytest.mark.parametrize(
    ("point", "landed_before_restart"),
    [("mqtt_after_landing", True), ("mqtt_after_journal", False), ("mqtt_before_journal", False)],
)
def test_a_bridge_killed_around_landing_lands_each_untimed_reading_once(
    broker: MosquittoBroker,
    data_dir: Path,
    settings: Settings,
    tmp_path: Path,
    point: str,
    landed_before_restart: bool,
) -> None:
    messages = [untimed(i) for i in range(UNTIMED)] + POISON
    # One batch, closed by count as the last message arrives: the kill catches all of it.
    config = bridge_config(broker, batch_max_messages=len(messages), batch_max_latency_ms=600_000)
    proc = start_bridge_process(config, data_dir, tmp_path, "killed", LAKEHOUSE_CRASH_AT=point)
    try:
        wait_logged(tmp_path / "killed.log", "mqtt.subscribed")
        publish(broker, messages)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    expected = UNTIMED if landed_before_restart else 0
    assert landed(data_dir).height == expected  # ... and not one PUBACK was sent
    assert dead_letters(data_dir).height == (len(POISON) if landed_before_restart else 0)

    # Restarted on the same persistent session: the broker redelivers the whole batch.
    quick = config.model_copy(update={"batch_max_latency_ms": 100})
    with running_bridge(quick, writer_for(data_dir)) as bridge:
        wait_until(lambda: bridge.acked == len(messages), timeout=30)
    assert landed_values(data_dir) == list(range(UNTIMED))  # each exactly once
    assert dead_letters(data_dir).height == len(POISON)
    assert bridge.redelivered == len(messages)
    assert bridge.skipped_redeliveries == (len(messages) if landed_before_restart else 0)

    Processor(settings, load_contracts()).run_once()
    silver = pl.read_delta(str(data_dir / "silver" / "readings"))
    assert sorted(silver["value"].to_list()) == [float(i) for i in range(UNTIMED)]
    letters = pl.read_delta(str(data_dir / "quarantine" / DEAD_LETTERS))
    assert letters.height == len(POISON)


@needs_mosquitto
def test_a_batch_landed_after_its_connection_dropped_is_not_landed_again(
    broker: MosquittoBroker, data_dir: Path
) -> None:
    class HeldDisk(LandingWriter):
        """The first landing file waits until the test releases the disk."""

        def __init__(self, layout: LandingLayout) -> None:
            super().__init__(layout)
            self.writing = threading.Event()
            self.release = threading.Event()

        def write_frame(
            self, source: str, frame: pl.DataFrame, *, batch_id: str | None = None
        ) -> LandingReceipt:
            if not self.writing.is_set():
                self.writing.set()
                assert self.release.wait(30)
            return super().write_frame(source, frame, batch_id=batch_id)

    writer = HeldDisk(LandingLayout(data_dir))
    count = 20
    config = bridge_config(broker, batch_max_messages=count, batch_max_latency_ms=600_000)
    with running_bridge(config, writer) as bridge:
        publish(broker, [untimed(i) for i in range(count)])
        assert writer.writing.wait(10)  # the batch is being landed, not acknowledged
        broker.stop()
        wait_until(lambda: not bridge.connected, timeout=10)
        writer.release.set()  # ... and completes for a connection that is gone
        wait_until(lambda: landed(data_dir).height == count, timeout=10)
        broker.start()
        wait_until(lambda: bridge.acked == count, timeout=30)
    assert landed_values(data_dir) == list(range(count))
    assert bridge.redelivered == count and bridge.skipped_redeliveries == count


def seed_journal(
    data_dir: Path, config: MqttBridgeConfig, messages: list[tuple[str, bytes]]
) -> RedeliveryJournal:
    """A journal holding every message under every packet id 1..100, as landed."""
    marker = writer_for(data_dir).write_frame("markers", pl.DataFrame({"x": ["1"]}))
    ref = LandingRef("markers", marker.batch_id)
    entries = [
        (mid, 1, topic.encode(), payload, 0.0)
        for mid in range(1, 101)
        for topic, payload in messages
    ]
    path = journal_path(data_dir, config.host, config.port, config.client_id)
    layout = LandingLayout(data_dir)
    journal = RedeliveryJournal.open(
        path, 2 * config.batch_max_messages, lambda r: layout.batch_exists(r.source, r.batch_id)
    )
    record(journal, [(ref, entries), (LandingRef(DEAD_LETTERS, "none"), [])], seen=0)
    return journal


@needs_mosquitto
def test_new_messages_land_even_with_their_packet_ids_in_the_journal(
    broker: MosquittoBroker, data_dir: Path
) -> None:
    config = bridge_config(broker)
    with running_bridge(config, writer_for(data_dir)):
        pass  # creates the persistent session, so the journal is not cleared as stale
    messages = [untimed(i) for i in range(20)]
    seed_journal(data_dir, config, messages)
    with running_bridge(config, writer_for(data_dir)) as bridge:
        # The journal would recognise copies of them (DUP set) as landed...
        first = (1, 1, messages[0][0].encode(), messages[0][1], 0.0)
        live = bridge._receive_window()
        assert bridge._journal.known([first], [0], connection=-2, seen=0, window=live) == [0]
        publish(broker, messages)
        wait_until(lambda: bridge.acked == len(messages), timeout=20)
    # ... but without DUP every message is new: all landed.
    assert landed_values(data_dir) == list(range(20))
    assert bridge.redelivered == 0 and bridge.skipped_redeliveries == 0


@needs_mosquitto
def test_a_session_the_broker_lost_clears_the_journal(
    broker: MosquittoBroker, data_dir: Path
) -> None:
    config = bridge_config(broker, client_id=f"lost-{uuid.uuid4().hex[:8]}")  # no session
    seed_journal(data_dir, config, [untimed(0)])
    path = journal_path(data_dir, config.host, config.port, config.client_id)
    assert len(path.read_bytes()) > len(MAGIC)
    with capture_logs() as logs, running_bridge(config, writer_for(data_dir)) as bridge:
        assert bridge._journal.batches == 0
    assert path.read_bytes() == MAGIC  # durably: a restart cannot bring the records back
    assert [e for e in logs if e["event"] == "mqtt.journal_cleared"]


@needs_mosquitto
def test_a_journal_that_cannot_be_cleared_keeps_the_bridge_from_subscribing(
    broker: MosquittoBroker, data_dir: Path
) -> None:
    config = bridge_config(broker, client_id=f"lost-{uuid.uuid4().hex[:8]}")  # no session
    seed_journal(data_dir, config, [untimed(0)])
    bridge = MqttBridge(config, writer_for(data_dir), LandingLayout(data_dir))
    clear = bridge._journal.reset
    attempts = []

    def full_disk_once() -> bool:
        attempts.append(bridge.subscribed.is_set())
        if len(attempts) == 1:
            raise OSError(28, "No space left on device")
        return clear()

    bridge._journal.reset = full_disk_once  # type: ignore[method-assign]
    stop = threading.Event()
    thread = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    with capture_logs() as logs:
        thread.start()
        try:
            assert bridge.subscribed.wait(15)
            # Retried on the next connection, although the broker has our session by then.
            assert attempts == [False, False] and bridge._journal.batches == 0
            publish(broker, [untimed(i) for i in range(3)])
            wait_until(lambda: bridge.acked == 3, timeout=15)
        finally:
            stop.set()
            thread.join(15)
    failed = [e for e in logs if e["event"] == "mqtt.journal_reset_failed"]
    assert len(failed) == 1 and "No space left" in failed[0]["error"]
    assert bridge.connect_failures >= 1
    assert landed_values(data_dir) == [0, 1, 2]
