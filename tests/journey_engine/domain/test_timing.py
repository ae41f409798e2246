"""A customer's timezone and date traits as the journey engine reads them: hostile values fall back
instead of failing the customer's every event. When a broadcast's schedule runs once edited or resumed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.journey_engine.domain.timing import (
    SchedulePassed,
    parse_instant,
    run_after_edit,
    run_on_resume,
    upcoming_run,
    zone,
)

PARIS = ZoneInfo("Europe/Paris")
DAY = timedelta(days=1)


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


AT = datetime(2026, 1, 6, 9, 0, tzinfo=UTC)
WEEK = timedelta(days=7)


def test_a_live_schedule_follows_its_definition_when_edited() -> None:
    now = AT + timedelta(days=1)
    later = now + timedelta(days=6)
    # A run not started moves to an `at` ahead, one-off or recurring, from wherever it was.
    for pending in (AT, AT + WEEK, None):
        assert run_after_edit(later, None, pending=pending, started=False, now=now) == later
        assert run_after_edit(later, WEEK, pending=pending, started=False, now=now) == later
    # A recurring schedule begun already: its first run after now, on the new grid; a due run goes out.
    assert run_after_edit(AT, timedelta(days=3), pending=AT + WEEK, started=False, now=now) == AT + 3 * DAY
    assert run_after_edit(AT, timedelta(days=3), pending=now, started=False, now=now) == now
    # A one-off whose `at` has passed: sent already, or due as it was, it stays so...
    assert run_after_edit(AT, None, pending=None, started=False, now=now) is None
    assert run_after_edit(AT, None, pending=AT, started=False, now=now) == AT
    # ...but one not sent yet is not moved into the past.
    with pytest.raises(SchedulePassed) as passed:
        run_after_edit(AT, None, pending=later, started=False, now=now)
    assert passed.value.due == AT
    # A run in progress finishes first, whatever the edit says.
    assert run_after_edit(later, WEEK, pending=AT, started=True, now=now) == AT
    assert run_after_edit(AT - WEEK, None, pending=AT, started=True, now=now) == AT


def test_a_resumed_schedule_follows_its_definition_not_the_run_left_pending() -> None:
    now = AT + timedelta(days=9)
    for every in (None, WEEK):
        # A run in progress goes on where it stopped; an `at` ahead is the next run, wherever the
        # pending one was (an earlier release's edit left it at its old time).
        assert run_on_resume(AT, every, pending=AT, started=True, now=now) == AT
        for pending in (None, AT, now + DAY):
            assert (
                run_on_resume(now + 2 * DAY, every, pending=pending, started=False, now=now) == now + 2 * DAY
            )
    # Due while paused: a recurring schedule's next run is its first after now, on its grid...
    for pending in (AT + WEEK, now + DAY, None):
        assert run_on_resume(AT, WEEK, pending=pending, started=False, now=now) == AT + 2 * WEEK
    # ...a one-off sent already stays done, one not sent is not sent late at once.
    assert run_on_resume(AT, None, pending=None, started=False, now=now) is None
    for pending in (AT, now + DAY):
        with pytest.raises(SchedulePassed) as passed:
            run_on_resume(AT, None, pending=pending, started=False, now=now)
        assert passed.value.due == AT


def test_upcoming_run_is_at_while_ahead_then_the_grid() -> None:
    assert upcoming_run(AT, WEEK, AT - DAY) == AT
    assert upcoming_run(AT, WEEK, AT) == AT + WEEK
    assert upcoming_run(AT, WEEK, AT + timedelta(days=20)) == AT + 3 * WEEK
    assert upcoming_run(AT, None, AT - DAY) == AT
    assert upcoming_run(AT, None, AT) is None
