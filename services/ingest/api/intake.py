"""Around every ingest endpoint: who sent it (write key, 401) and writing it (429 / 503 + Retry-After)."""

from __future__ import annotations

from fastapi import Request

from services.ingest.domain.validation import FieldError
from services.ingest.domain.write_keys import key_from_authorization
from services.ingest.event_writer import (
    EventTooLarge,
    EventWriter,
    Overloaded,
    PreparedEvent,
    Unavailable,
    WriteOutcome,
)
from services.ingest.settings import IngestSettings
from services.ingest.write_keys import WriteKeys
from shared.clock import Clock
from shared.contracts.events import CustomerEvent
from shared.http import ApiError


class Intake:
    """What every ingest endpoint does around validation: authenticate, then write (dedupe + publish)."""

    def __init__(
        self, settings: IngestSettings, writer: EventWriter, write_keys: WriteKeys, clock: Clock
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.write_keys = write_keys
        self.clock = clock

    async def source_of(self, key: object) -> str:
        """The write key's id, or 401."""
        if not isinstance(key, str) or not key:
            raise ApiError(
                401,
                "unauthorized",
                "a write key is required: HTTP Basic user name (empty password) or Authorization: Bearer",
                headers={"WWW-Authenticate": 'Basic realm="clm"'},
            )
        try:
            found = await self.write_keys.authenticate(key)
        except Exception as exc:  # the key store is unreachable: the client should retry, not give up
            raise ApiError(
                503,
                "unavailable",
                "write keys cannot be checked right now; retry later",
                headers={"Retry-After": str(self.settings.unavailable_retry_after_s)},
            ) from exc
        if found is None:
            raise ApiError(
                401,
                "unauthorized",
                "unknown or revoked write key",
                headers={"WWW-Authenticate": 'Basic realm="clm"'},
            )
        return found

    async def header_source(self, request: Request) -> str | None:
        key = key_from_authorization(request.headers.get("authorization"))
        return None if key is None else await self.source_of(key)

    def prepare(self, event: CustomerEvent, field: str) -> PreparedEvent | list[FieldError]:
        """The event's Kafka message, or why it cannot be one (named `field`)."""
        try:
            return self.writer.prepare(event)
        except EventTooLarge as exc:
            return [
                FieldError(
                    field,
                    "max_size",
                    f"the event is {exc.size} bytes as a Kafka message (numbers and batch context "
                    f"included), more than {exc.limit}",
                )
            ]

    async def write(self, events: list[PreparedEvent]) -> WriteOutcome:
        try:
            return await self.writer.write(events)
        except Overloaded as exc:
            retry = str(self.settings.overload_retry_after_s)
            raise ApiError(
                429, "overloaded", "too many events in flight; retry later", headers={"Retry-After": retry}
            ) from exc
        except Unavailable as exc:
            retry = str(self.settings.unavailable_retry_after_s)
            raise ApiError(
                503,
                "unavailable",
                "the event log cannot take events right now; retry later",
                headers={"Retry-After": retry},
            ) from exc


def invalid(errors: list[FieldError]) -> ApiError:
    return ApiError(400, "invalid_event", "the event is invalid", errors=[e.as_json() for e in errors])
