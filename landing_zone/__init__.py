"""Landing zone: durable batch files written by every writer, read by bronze.

Knows nothing of Delta; depends only on :mod:`config`.
"""

from landing_zone.formats import BatchDecodeError, decode_batch, read_batch_file
from landing_zone.layout import LandingLayout, check_source_name
from landing_zone.writer import LandingReceipt, LandingWriteError, LandingWriter

__all__ = [
    "BatchDecodeError",
    "LandingLayout",
    "LandingReceipt",
    "LandingWriteError",
    "LandingWriter",
    "check_source_name",
    "decode_batch",
    "read_batch_file",
]
