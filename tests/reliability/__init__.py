"""Fault injection and fuzzing (issue 7): `make reliability` runs them in full, CI short.

Sizes come from the environment: ``LAKEHOUSE_RELIABILITY_KILLS`` (kill-loop SIGKILLs),
``LAKEHOUSE_RELIABILITY_RESTARTS`` (broker restarts of each kind) and
``LAKEHOUSE_RELIABILITY_CASES`` (schemathesis cases in all). Unset, each test runs its
short CI form.
"""
