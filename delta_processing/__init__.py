"""Delta processing: bronze, silver and gold jobs over the landing zone.

Knows nothing of HTTP; depends on :mod:`config` and :mod:`landing_zone`.
"""

from delta_processing.processor import CycleReport, Processor, ProcessorLockedError

__all__ = ["CycleReport", "Processor", "ProcessorLockedError"]
