"""The landing writer: durable, atomic, and clean when the disk refuses a write."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from landing_zone.layout import LandingLayout, is_landing_file
from landing_zone.writer import LandingWriter, new_batch_id
from tests.helpers import REPO


def test_write_is_visible_only_under_its_final_name(data_dir: Path) -> None:
    writer = LandingWriter(LandingLayout(data_dir))
    frame = pl.DataFrame({"a": ["1", "2"]})
    receipt = writer.write_frame("readings", frame)
    assert receipt.path == data_dir / "landing" / "readings" / f"{receipt.batch_id}.parquet"
    assert receipt.records == 2 and receipt.bytes_written == receipt.path.stat().st_size
    assert pl.read_parquet(receipt.path).equals(frame)
    assert list((data_dir / "landing" / "readings" / ".tmp").iterdir()) == []
    assert is_landing_file(receipt.path)


def test_batch_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_batch_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert sorted(ids, key=lambda i: i.split("-")[0]) == ids


def test_a_refused_write_raises_landing_write_error_and_leaves_nothing(data_dir: Path) -> None:
    """A real kernel refusal (file size limit, EFBIG) in a child process."""
    script = textwrap.dedent(
        f"""
        import errno, resource, signal, sys
        import polars as pl
        from pathlib import Path
        from landing_zone.layout import LandingLayout
        from landing_zone.writer import LandingWriter, LandingWriteError
        writer = LandingWriter(LandingLayout(Path({str(data_dir)!r})))
        writer.write_frame("readings", pl.DataFrame({{"a": ["ok"]}}))  # dirs exist now
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
        big = pl.DataFrame({{"a": [str(i) * 50 for i in range(2000)]}})
        try:
            writer.write_frame("readings", big)
        except LandingWriteError as exc:
            print("refused", errno.errorcode[exc.errno])
            sys.exit(0)
        sys.exit("write unexpectedly succeeded")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused EFBIG"
    landing = data_dir / "landing" / "readings"
    assert len(list(landing.glob("*.parquet"))) == 1  # only the first, complete batch
    assert list((landing / ".tmp").iterdir()) == []


def test_batch_exists_looks_again_when_a_claim_vanishes_while_listed(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bronze removes a claim directory after archiving its files; a listing caught in
    between (FileNotFoundError from scandir) must look again, not fail the caller (the
    MQTT bridge's journal asks at start-up, while the processor runs)."""
    layout = LandingLayout(data_dir)
    archived = data_dir / "archive" / "readings" / "2026-11-22"
    archived.mkdir(parents=True)
    (archived / "b1.parquet").write_bytes(b"x")
    (layout.inflight_root("readings") / "00000000000000000007").mkdir(parents=True)
    real_glob = Path.glob
    vanished = {"left": 1}

    def racing_glob(self: Path, pattern: str) -> object:
        if vanished["left"] and self == layout.inflight_root("readings"):
            vanished["left"] -= 1
            raise FileNotFoundError(2, "No such file or directory", str(self / "0007"))
        return real_glob(self, pattern)

    monkeypatch.setattr(Path, "glob", racing_glob)
    assert layout.batch_exists("readings", "b1")
    assert vanished["left"] == 0
    assert not layout.batch_exists("readings", "b2")
