"""Ingest settings (env prefix `CLM_`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from services.ingest.domain.write_keys import DEVELOPMENT_WRITE_KEY
from shared.settings import BaseServiceSettings


class IngestSettings(BaseServiceSettings):
    service_name: str = "ingest"
    port: int = 8001
    db_schema: str = "ingest"

    # Comma-separated write keys accepted on start (stored hashed like any other): local runs and tests.
    write_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Origins whose pages may post events from the browser (CORS on /v1/...; comma-separated, empty:
    # none). `*` as Segment's API: analytics.js runs on the sites of whoever holds a write key.
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    # How long a write key lookup is trusted in memory. A revoke on another replica takes effect
    # within this many seconds (on the replica that served the revoke, at once).
    write_key_cache_ttl_s: float = 5.0

    # A messageId seen within this window is answered as a success and not published again.
    dedupe_window_s: float = 24 * 3600
    # Recently published messageIds remembered in process, so most duplicates skip the database.
    dedupe_cache_size: int = 200_000
    dedupe_prune_interval_s: float = 300.0

    # Segment's limits: one event, one batch (after gzip decompression).
    max_event_bytes: int = 32 * 1024
    max_batch_bytes: int = 500 * 1024
    # Events accepted but not yet acknowledged by Kafka; past it new requests get 429.
    max_in_flight_events: int = 20_000
    max_concurrent_imports: int = 2
    overload_retry_after_s: int = 1

    # A publish not acknowledged by Kafka within this time is answered 503 (the client retries).
    produce_timeout_s: float = 5.0
    unavailable_retry_after_s: int = 5
    produce_linger_ms: int = 1
    # Concurrent group commits (each: one dedupe transaction + one Kafka round trip).
    writer_concurrency: int = 8
    writer_max_events: int = 2000

    import_chunk_events: int = 500
    import_progress_interval_s: float = 1.0
    import_max_reported_errors: int = 100
    # A gzip import may inflate at most this many times what was sent (past a first max_batch_bytes):
    # NDJSON inflates 5-30x, a gzip bomb ~1,000x. Past it: 413 (or an incomplete summary).
    import_max_gzip_ratio: int = 100

    @field_validator("write_keys", "cors_allow_origins", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    def insecure_settings(self) -> list[str]:
        problems = super().insecure_settings()
        weak = [k for k in self.write_keys if k == DEVELOPMENT_WRITE_KEY or len(k) < self.MIN_SECRET_LENGTH]
        if weak:
            problems.append(
                f"CLM_WRITE_KEYS holds {len(weak)} key(s) that are the development default or shorter "
                f"than {self.MIN_SECRET_LENGTH} characters"
            )
        return problems
