"""Mapping of MQTT messages to landing records: topic patterns and payload decoding.

Pure functions only (no network, no files), so every rule is unit-testable and the
bridge stays a thin transport. A message either becomes ``(source, record)`` or
raises :class:`MessageRejected`, whose reason goes to the dead-letter table with
the raw bytes: nothing is dropped silently.

Records are *raw*, like :mod:`landing_zone.formats`: every value is a string (numbers
in their JSON spelling, nested objects and arrays as JSON text) or ``None``; typing
happens in silver against the source contract.

The built-in :data:`DEVICE_PATTERN` maps ``<type>/f2-<MAC>/<mode>/<connector>/<component>``
(``type`` one of ``cmnd``, ``stat``, ``tele``) to a ``readings`` record::

    topic   tele/f2-AA-BB-CC-DD-EE-FF/live/c1/temperature    payload {"value": 21.5, "unit": "C"}
    record  device_id="aa:bb:cc:dd:ee:ff"  sensor="c1/temperature"  value="21.5"  unit="C"
            ts=<receive time, ISO-8601 UTC>  mqtt_topic=<topic>  mqtt_type="tele"  mqtt_mode="live"
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from config.contracts import is_valid_source_name
from landing_zone.formats import first_wins

RawRecord = dict[str, str | None]

# A template placeholder: ``{name}`` stands for one whole-or-partial topic level.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# 12 hex digits, bare or in pairs joined by one separator used consistently.
_MAC = re.compile(r"[0-9A-Fa-f]{2}(?P<sep>[:-]?)[0-9A-Fa-f]{2}(?:(?P=sep)[0-9A-Fa-f]{2}){4}")
# Numbers as devices print them, including spellings JSON refuses (``+5``, ``.5``, ``5.``).
_BARE_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_SHARED_PREFIX = re.compile(r"^\$share/[^/#+]+/")
# A JSON escape of a UTF-16 surrogate (\ud800-\udfff), paired or not.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class MessageRejected(ValueError):
    """A poison message: no record can be made of it. ``reason`` says why, naming the topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def normalize_mac(text: str) -> str | None:
    """``aa:bb:cc:dd:ee:ff`` for a MAC spelled with ``:``, ``-`` or no separator; else ``None``."""
    if not _MAC.fullmatch(text):
        return None
    digits = re.sub(r"[:-]", "", text).lower()
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def validate_topic_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid MQTT subscription filter, else raise ValueError.

    ``+`` must fill a whole level and ``#`` must be the whole last level (MQTT 5, 4.7.1);
    a shared subscription (``$share/<group>/<filter>``) is accepted.
    """
    if not topic_filter or "\x00" in topic_filter:
        raise ValueError("a topic filter must be a non-empty string without NUL")
    body = _SHARED_PREFIX.sub("", topic_filter)
    if topic_filter.startswith("$share/") and body == topic_filter:
        raise ValueError(f"invalid shared subscription {topic_filter!r}: use $share/<group>/<f>")
    levels = body.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"invalid topic filter {topic_filter!r}: '#' must be the last level")
        if "+" in level and level != "+":
            raise ValueError(f"invalid topic filter {topic_filter!r}: '+' must fill a level")
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches the subscription filter (``$share/<group>/`` ignored).

    Wildcards never match topics starting with ``$`` at the first level (MQTT 5, 4.7.2).
    """
    levels = _SHARED_PREFIX.sub("", topic_filter).split("/")
    parts = topic.split("/")
    if parts[0].startswith("$") and levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(levels):
        if level == "#":
            return True
        if index >= len(parts) or (level != "+" and level != parts[index]):
            return False
    return len(parts) == len(levels)


def template_regex(template: str) -> str:
    """A full-match regex for a template such as ``{type}/f2-{mac}/{mode}``.

    Each ``{name}`` captures one or more characters within a single topic level;
    everything else matches literally.
    """
    out: list[str] = []
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        out.append(re.escape(template[position : match.start()]))
        out.append(f"(?P<{match.group(1)}>[^/]+)")
        position = match.end()
    out.append(re.escape(template[position:]))
    return "^" + "".join(out) + "$"


class TopicPattern(BaseModel):
    """How the topics of one subscription filter become records of one landing source.

    ``pattern`` is a template (``{type}/f2-{mac}/{mode}/{connector}/{component}``) or, when it
    starts with ``^``, a regular expression with named groups; it must match the whole topic.
    Captured groups are then checked: ``allowed`` restricts a group to listed values and
    ``mac_groups`` validates a group as a MAC address and normalises it to ``aa:bb:cc:dd:ee:ff``.
    ``fields`` fills record fields from templates over the (normalised) groups, e.g.
    ``{"sensor": "{connector}/{component}"}``. Every record also gets ``mqtt_topic``.

    Payloads: a JSON object's members become fields; a JSON number or bare numeric text
    becomes ``value_field``. ``time_field`` (unless ``None``) is set to the receive time
    when the payload has none. Topic-derived fields win over payload members of the same
    name; a payload member that disagrees is kept as ``payload_<name>`` so nothing is lost.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="Label used in logs and errors.")
    filter: str = Field(description="MQTT subscription filter, e.g. '+/+/+/+/+'.")
    pattern: str = Field(min_length=1, description="Template or ^regex matching the topic.")
    source: str = Field(description="Landing source the records go to, e.g. 'readings'.")
    fields: dict[str, str] = Field(default_factory=dict)
    allowed: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    mac_groups: tuple[str, ...] = ()
    value_field: str = "value"
    time_field: str | None = "ts"

    _regex: re.Pattern[str] = PrivateAttr()

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, value: str) -> str:
        return validate_topic_filter(value)

    @field_validator("source")
    @classmethod
    def _valid_source(cls, value: str) -> str:
        if not is_valid_source_name(value):
            raise ValueError(
                f"invalid source name {value!r}: use 1-63 lowercase letters, digits or '_', "
                "starting with a letter"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TopicPattern:
        source = self.pattern if self.pattern.startswith("^") else template_regex(self.pattern)
        try:
            regex = re.compile(source)
        except re.error as exc:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regex: {exc}") from None
        groups = set(regex.groupindex)
        used = {g for t in self.fields.values() for g in _PLACEHOLDER.findall(t)}
        for group in sorted(used | set(self.allowed) | set(self.mac_groups)):
            if group not in groups:
                raise ValueError(f"group {group!r} is not captured by pattern {self.pattern!r}")
        self._regex = regex
        return self

    def match(self, topic: str) -> dict[str, str]:
        """The checked, normalised groups of ``topic``; :class:`MessageRejected` if it fails."""
        found = self._regex.fullmatch(topic)
        if found is None:
            raise MessageRejected(
                f"topic {topic!r} does not match pattern {self.name!r} ({self.pattern})"
            )
        groups = {k: v for k, v in found.groupdict().items() if v is not None}
        for group, values in self.allowed.items():
            if groups.get(group) not in values:
                raise MessageRejected(
                    f"topic {topic!r}: {group} {groups.get(group)!r} is not one of "
                    f"{', '.join(values)}"
                )
        for group in self.mac_groups:
            mac = normalize_mac(groups.get(group, ""))
            if mac is None:
                raise MessageRejected(
                    f"topic {topic!r}: invalid MAC address {groups.get(group)!r}: expected 12 "
                    "hex digits, optionally in pairs separated by ':' or '-'"
                )
            groups[group] = mac
        return groups

    def topic_fields(self, topic: str, groups: Mapping[str, str]) -> RawRecord:
        """The record fields derived from the topic alone."""
        record: RawRecord = {"mqtt_topic": topic}
        for name, template in self.fields.items():
            record[name] = _PLACEHOLDER.sub(lambda m: groups[m.group(1)], template)
        return record


DEVICE_PATTERN = TopicPattern(
    name="device",
    filter="+/+/+/+/+",
    pattern="{type}/f2-{mac}/{mode}/{connector}/{component}",
    source="readings",
    fields={
        "device_id": "{mac}",
        "sensor": "{connector}/{component}",
        "mqtt_type": "{type}",
        "mqtt_mode": "{mode}",
    },
    allowed={"type": ("cmnd", "stat", "tele")},
    mac_groups=("mac",),
)
"""The built-in device mapping (see the module docstring).

Its filter takes every five-level topic, so that a device with a malformed topic (bad MAC,
unknown type, missing ``f2-``) shows up in the dead-letter table instead of being ignored.
"""


def iso_utc(moment: datetime) -> str:
    """ISO-8601 UTC with microseconds and ``Z`` (naive datetimes are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    # isoformat is several times cheaper than strftime; in UTC it ends in +00:00.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


@dataclass(frozen=True)
class TopicMatch:
    """What a topic maps to: the pattern that accepted it and the record fields it gives."""

    pattern: TopicPattern
    fields: RawRecord  # derived from the topic alone, ``mqtt_topic`` included; never mutated


def map_topic(topic: str, patterns: Iterable[TopicPattern]) -> TopicMatch:
    """The first pattern whose filter and pattern both match ``topic``, with its fields.

    Raises :class:`MessageRejected` for a topic no pattern accepts, giving the reason of
    the most specific failure (bad MAC, type not allowed...). Depends on the topic alone,
    so callers may memoise it per topic.
    """
    candidates = [p for p in patterns if topic_matches(p.filter, topic)]
    if not candidates:
        raise MessageRejected(f"topic {topic!r} matches no configured topic filter")
    failure: MessageRejected | None = None
    for pattern in candidates:
        try:
            groups = pattern.match(topic)
        except MessageRejected as exc:
            failure = failure or exc
            continue
        return TopicMatch(pattern, pattern.topic_fields(topic, groups))
    assert failure is not None
    raise failure


def map_message(
    topic: str, payload: bytes, received_at: datetime, patterns: Iterable[TopicPattern]
) -> tuple[str, RawRecord]:
    """Turn one MQTT message into ``(source, raw record)``.

    Raises :class:`MessageRejected` for a topic no pattern accepts (see :func:`map_topic`)
    and for a payload that is not UTF-8, empty, not a JSON object or number, or not
    finite (NaN, Infinity).
    """
    found = map_topic(topic, patterns)
    return found.pattern.source, message_record(found, topic, payload, received_at)


def message_record(
    found: TopicMatch, topic: str, payload: bytes, received_at: datetime
) -> RawRecord:
    """The record of a message whose topic mapped to ``found``; see :func:`map_message`."""
    pattern = found.pattern
    derived = found.fields
    fields = decode_payload(topic, payload, pattern.value_field)
    if derived.keys().isdisjoint(fields):
        record = derived | fields
    else:
        record = _merge_disagreeing(topic, derived, fields)
    if pattern.time_field is not None and record.get(pattern.time_field) is None:
        record[pattern.time_field] = iso_utc(received_at)
    return record


def _merge_disagreeing(topic: str, derived: RawRecord, fields: RawRecord) -> RawRecord:
    record = derived | {k: v for k, v in fields.items() if k not in derived}
    for name, value in fields.items():
        if name in derived and derived[name] != value:
            # The topic is authoritative (broker ACLs are written against it), but the
            # device's own claim is data too: keep it beside, never overwrite it silently.
            kept = f"payload_{name}"
            if kept in fields or kept in derived:
                raise MessageRejected(
                    f"topic {topic!r}: payload field {name!r} contradicts the topic and "
                    f"{kept!r} is taken"
                )
            record[kept] = value
    return record


def decode_payload(topic: str, payload: bytes, value_field: str = "value") -> RawRecord:
    """The raw fields of a payload: a JSON object's members, or ``{value_field: number}``.

    Raises :class:`MessageRejected` naming ``topic`` when the payload is none of those.
    """
    fields = plain_object_fields(payload)
    if fields is not None:
        return fields
    return checked_payload_fields(topic, payload, value_field)


def plain_object_fields(payload: bytes) -> RawRecord | None:
    """The fields of a plain JSON object payload, on the fast path; ``None`` for anything else.

    Devices mostly send small flat objects: this parses them at C speed and skips the
    checks that cannot fail for them. Whatever is unusual (not starting with ``{``, not
    UTF-8, not JSON, surrogate escapes, NaN or out-of-range numbers) returns ``None``,
    and :func:`checked_payload_fields` then decides and explains. Both give the same
    fields for every payload this accepts (tests/test_mqtt_batch.py checks it).
    """
    if not payload.startswith(b"{"):
        return None
    try:
        text = payload.decode("utf-8")
        if "\\u" in text and _SURROGATE_ESCAPE.search(text):
            return None  # a lone surrogate has no UTF-8 form: the checked path refuses it
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError included
        return None
    fields: RawRecord = {}
    for name, item in value.items():
        kind = type(item)
        if kind is str or item is None:
            fields[name] = item
        elif kind is float:
            if item - item != 0.0:  # NaN or infinite (NaN literals, 1e999)
                return None
            fields[name] = repr(item)  # json.dumps spells floats and ints with repr
        elif kind is int:
            fields[name] = repr(item)
        elif kind is bool:
            fields[name] = "true" if item else "false"
        else:
            try:
                fields[name] = json.dumps(
                    item, separators=(",", ":"), ensure_ascii=False, allow_nan=False
                )
            except (ValueError, RecursionError):
                return None
    return fields


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # dict() runs in C; only objects that repeat a key pay for first_wins.
    record = dict(pairs)
    return record if len(record) == len(pairs) else first_wins(pairs)


def checked_payload_fields(topic: str, payload: bytes, value_field: str = "value") -> RawRecord:
    """:func:`decode_payload` with every check on every payload (the reference path)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageRejected(
            f"topic {topic!r}: payload is not valid UTF-8 (byte {exc.start})"
        ) from None
    text = text.strip()
    if not text:
        raise MessageRejected(f"topic {topic!r}: empty payload")
    try:
        # Repeated keys: the first value wins, as for every other writer.
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=first_wins)
    except _NonFinite as exc:
        raise MessageRejected(f"topic {topic!r}: {exc} is not a finite number") from None
    except RecursionError:
        raise MessageRejected(f"topic {topic!r}: JSON payload nested too deeply") from None
    except json.JSONDecodeError as exc:
        if _BARE_NUMBER.fullmatch(text):
            return {value_field: _bare_number(topic, text)}
        if _NON_FINITE.fullmatch(text):
            raise MessageRejected(f"topic {topic!r}: {text} is not a finite number") from None
        raise MessageRejected(
            f"topic {topic!r}: payload is neither JSON nor a number: {exc.msg} "
            f"(line {exc.lineno}, column {exc.colno})"
        ) from None
    if isinstance(value, dict):
        fields = {str(k): _raw_value(topic, k, v) for k, v in value.items()}
        try:
            json.dumps(fields, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            # JSON can spell a lone surrogate (\ud800); a landing file cannot hold it.
            raise MessageRejected(
                f"topic {topic!r}: payload holds a lone UTF-16 surrogate escape, "
                "which has no UTF-8 form"
            ) from None
        return fields
    # bool is an int subclass: true/false are not readings.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {value_field: _raw_value(topic, value_field, value)}
    raise MessageRejected(
        f"topic {topic!r}: payload is a JSON {_kind(value)}; expected a JSON object or a number"
    )


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> None:
    raise _NonFinite(name)


def _bare_number(topic: str, text: str) -> str:
    """Canonical spelling of numeric text JSON refuses (``+5`` -> ``5``, ``.5`` -> ``0.5``)."""
    if re.fullmatch(r"[+-]?\d+", text):
        return str(int(text))
    number = float(text)
    if not math.isfinite(number):
        raise MessageRejected(f"topic {topic!r}: {text} is out of the float range")
    return repr(number)


def _raw_value(topic: str, name: object, value: Any) -> str | None:
    """A JSON value as raw text, the way :mod:`landing_zone.formats` spells it."""
    if value is None or isinstance(value, str):
        return value
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        # json.loads reads 1e999 as inf; dumps refuses to spell it as JSON.
        raise MessageRejected(
            f"topic {topic!r}: field {name!r} holds a number out of the float range"
        ) from None


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {str: "string", list: "array", bool: "boolean"}.get(type(value), type(value).__name__)


__all__ = [
    "DEVICE_PATTERN",
    "MessageRejected",
    "RawRecord",
    "TopicMatch",
    "TopicPattern",
    "checked_payload_fields",
    "decode_payload",
    "iso_utc",
    "map_message",
    "map_topic",
    "message_record",
    "normalize_mac",
    "plain_object_fields",
    "template_regex",
    "topic_matches",
    "validate_topic_filter",
]
