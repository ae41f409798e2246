"""A customer's timezone and date traits as the journey engine reads them: hostile values fall back
instead of failing the customer's every event."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from services.journey_engine.domain.timing import parse_instant, zone

PARIS = ZoneInfo("Europe/Paris")


def test_zone_falls_back_to_the_default_then_utc() -> None:
    assert zone("Asia/Tokyo").key == "Asia/Tokyo"
    for hostile in ["Mars/Base", "../etc/passwd", "", "a" * 300, "x\x00"]:
        assert zone(hostile, "Europe/Paris").key == "Europe/Paris", hostile
    assert zone("a" * 300, "b" * 300).key == "UTC"


def test_parse_instant_reads_dates_and_datetimes_within_1900_to_2999() -> None:
    assert parse_instant("2026-02-01", PARIS) == datetime(2026, 2, 1, tzinfo=PARIS)
    assert parse_instant("2026-02-01T10:00:00Z", PARIS) == datetime(2026, 2, 1, 10, tzinfo=UTC)
    assert parse_instant(datetime(2026, 2, 1, 10), PARIS) == datetime(2026, 2, 1, 10, tzinfo=PARIS)
    for placeholder in ["9999-12-31", "9999-12-31T23:00:00-14:00", "0001-01-01", "1899-12-30", "3000-01-02"]:
        assert parse_instant(placeholder, PARIS) is None, placeholder
    for junk in ["soon", 42, None, {"at": "2026-02-01"}]:
        assert parse_instant(junk, PARIS) is None
    late = parse_instant("2999-12-31", PARIS)
    assert late is not None and late + timedelta(days=30) > late  # arithmetic stays in range
