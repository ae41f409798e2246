"""Validation of one Segment call: types by pydantic, then the rules of its call type.

Every error names the field (Segment's name, with its position in a batch) and the rule broken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from services.ingest.domain.calls import BYTE_LIMITS, CALL_MODELS, SegmentCall
from shared.contracts import storable
from shared.contracts.events import EventType

_TYPES = ", ".join(t.value for t in EventType)
MAX_BYTES_RULE = "max_bytes"
_BY_NAME = {t.value: t for t in EventType}


@dataclass(frozen=True)
class FieldError:
    field: str
    rule: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"field": self.field, "rule": self.rule, "message": self.message}


@dataclass(frozen=True)
class ValidCall:
    type: EventType
    call: SegmentCall


def _field(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def parse_type(raw: object, prefix: str = "") -> EventType | FieldError:
    if raw is None:
        return FieldError(_field(prefix, "type"), "missing", f"type is required (one of {_TYPES})")
    if isinstance(raw, str) and raw in _BY_NAME:
        return _BY_NAME[raw]
    return FieldError(_field(prefix, "type"), "enum", f"type must be one of {_TYPES}")


@dataclass(frozen=True)
class TextHints:
    """What the JSON text a call came from may hold, from byte scans (see `shared.contracts.storable`)
    that are much cheaper than walking every call: a NUL character, or nesting past the limit. The
    default assumes both, so the call is walked."""

    may_hold_nul: bool = True
    may_be_too_deep: bool = True

    @classmethod
    def of(cls, json_text: bytes) -> TextHints:
        return cls(storable.NUL_ESCAPE in json_text, storable.may_be_too_deep(json_text))


def validate_call(
    raw: Any, call_type: EventType | None = None, *, prefix: str = "", hints: TextHints = TextHints()
) -> ValidCall | list[FieldError]:
    """Validate one call. `call_type` is the endpoint's; a batch item (None) names its own `type`.
    Every consumer must be able to store it: no NUL character in any string, no nesting past
    `storable.MAX_DEPTH` (checked when `hints` says the JSON text may hold them)."""
    if not isinstance(raw, dict):
        return [FieldError(prefix or "body", "object_type", "an event must be a JSON object")]
    if hints.may_be_too_deep:
        deep = storable.too_deep_path(raw)
        if deep is not None:
            return [FieldError(_field(prefix, deep), storable.DEPTH_RULE, storable.DEPTH_MESSAGE)]
    if hints.may_hold_nul:
        found = storable.nul_path(raw)
        if found is not None:
            return [FieldError(_field(prefix, found), storable.RULE, storable.MESSAGE)]
    if call_type is None:
        parsed = parse_type(raw.get("type"), prefix)
        if isinstance(parsed, FieldError):
            return [parsed]
        call_type = parsed
    try:
        call = CALL_MODELS[call_type].model_validate(raw)
    except ValidationError as exc:
        return [
            FieldError(
                _field(prefix, ".".join(str(p) for p in err["loc"]) or "body"), err["type"], err["msg"]
            )
            for err in exc.errors(include_url=False)
        ]
    errors = _rules(call_type, call, prefix)
    return errors or ValidCall(call_type, call)


def _rules(call_type: EventType, call: SegmentCall, prefix: str) -> list[FieldError]:
    errors: list[FieldError] = []
    for attribute, name in (
        ("timestamp", "timestamp"),
        ("original_timestamp", "originalTimestamp"),
        ("sent_at", "sentAt"),
    ):
        value = getattr(call, attribute)
        if value is not None and not storable.time_in_range(value):
            errors.append(
                FieldError(_field(prefix, name), storable.TIME_RULE, f"{name} {storable.TIME_MESSAGE}")
            )
    for attribute, (name, limit) in BYTE_LIMITS.items():
        value = getattr(call, attribute, None)
        # At most 4 bytes a character: a short one needs no encoding.
        if value is not None and len(value) * 4 > limit:
            size = len(value.encode("utf-8", "surrogatepass"))
            if size > limit:
                errors.append(
                    FieldError(
                        _field(prefix, name),
                        MAX_BYTES_RULE,
                        f"{name} must be at most {limit} bytes in UTF-8 (it is {size})",
                    )
                )
    if not call.user_id and not call.anonymous_id:
        errors.append(
            FieldError(_field(prefix, "userId"), "required_one_of", "userId or anonymousId is required")
        )
    required: tuple[str, str] | None = {
        EventType.TRACK: ("event", "event"),
        EventType.ALIAS: ("previous_id", "previousId"),
        EventType.GROUP: ("group_id", "groupId"),
    }.get(call_type)
    if required is not None and not getattr(call, required[0]):
        errors.append(
            FieldError(
                _field(prefix, required[1]), "required", f"{call_type.value} needs a non-empty {required[1]}"
            )
        )
    return errors
