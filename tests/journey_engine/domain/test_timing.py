"""A customer's timezone and date traits as the journey engine reads them: hostile values fall back
instead of failing the customer's every event. When a broadcast's schedule runs once edited or resumed."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.journey_engine.domain.timing import (
    QuietHours,
    RunInProgress,
    Schedule,
    SchedulePassed,
    next_time_of_day,
    parse_instant,
    run_after_edit,
    run_on_activation,
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
    one_off, weekly = Schedule(AT), Schedule(AT, WEEK)
    # A run not started moves to an `at` ahead, one-off or recurring, from wherever it was.
    for previous, pending in ((one_off, AT), (weekly, AT + WEEK), (one_off, None), (None, None)):
        for every in (None, WEEK):
            edited = run_after_edit(later, every, previous=previous, pending=pending, started=False, now=now)
            assert edited == later
    # A recurring schedule begun already: its first run after now, on the new grid; a due run goes out.
    three_days = {"previous": weekly, "started": False, "now": now}
    assert run_after_edit(AT, timedelta(days=3), pending=AT + WEEK, **three_days) == AT + 3 * DAY
    assert run_after_edit(AT, timedelta(days=3), pending=now, **three_days) == now
    # A one-off whose `at` has passed: sent already, or due as it was, it stays so...
    assert run_after_edit(AT, None, previous=one_off, pending=None, started=False, now=now) is None
    assert run_after_edit(AT, None, previous=one_off, pending=AT, started=False, now=now) == AT
    # ...but one not sent yet is not moved into the past.
    with pytest.raises(SchedulePassed) as passed:
        run_after_edit(AT, None, previous=Schedule(later), pending=later, started=False, now=now)
    assert passed.value.due == AT
    # A run in progress finishes first, whatever the edit says.
    assert run_after_edit(later, WEEK, previous=weekly, pending=AT, started=True, now=now) == AT
    assert run_after_edit(AT - WEEK, None, previous=one_off, pending=AT, started=True, now=now) == AT


def test_a_recurring_schedule_made_a_one_off_runs_no_more() -> None:
    """Told from the version edited, not from `pending` alone: a recurring schedule's pending run is
    its next one, which said "not sent yet" (a 409 claiming the broadcast had not gone out)."""
    now = AT + timedelta(days=8)
    weekly = Schedule(AT, WEEK)
    assert run_after_edit(AT, None, previous=weekly, pending=AT + 2 * WEEK, started=False, now=now) is None
    # One whose first run has not come yet is a broadcast not sent: not moved into the past.
    ahead = Schedule(now + DAY, WEEK)
    with pytest.raises(SchedulePassed):
        run_after_edit(AT, None, previous=ahead, pending=now + DAY, started=False, now=now)
    # A run in progress finishes; `upcoming_run` then says no more.
    assert run_after_edit(AT, None, previous=weekly, pending=AT + WEEK, started=True, now=now) == AT + WEEK
    assert upcoming_run(AT, None, now) is None


def test_a_journey_that_was_no_broadcast_is_not_given_a_time_that_passed() -> None:
    """An event or segment journey made a one-off at a time that has passed: nothing pending, which
    read as "sent already" (200, and nothing ever went out)."""
    now = AT + DAY
    with pytest.raises(SchedulePassed) as passed:
        run_after_edit(AT, None, previous=None, pending=None, started=False, now=now)
    assert passed.value.due == AT
    # A recurring one starts on its grid; an `at` ahead is simply its first run.
    assert run_after_edit(AT, WEEK, previous=None, pending=None, started=False, now=now) == AT + WEEK
    assert run_after_edit(now + DAY, None, previous=None, pending=None, started=False, now=now) == now + DAY


def test_a_one_off_being_sent_is_not_given_a_time_ahead() -> None:
    """It would go out a second time then, to the members its run reached already."""
    now = AT + timedelta(minutes=5)
    with pytest.raises(RunInProgress) as running:
        run_after_edit(AT + DAY, None, previous=Schedule(AT), pending=AT, started=True, now=now)
    assert running.value.run_at == AT
    # A recurring one's run goes on, and the next run is the new one-off's (a new broadcast); a
    # one-off made recurring runs on its new grid after this run.
    assert (
        run_after_edit(AT + DAY, None, previous=Schedule(AT, WEEK), pending=AT, started=True, now=now) == AT
    )
    assert run_after_edit(AT + DAY, WEEK, previous=Schedule(AT), pending=AT, started=True, now=now) == AT


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


def test_an_activated_draft_runs_at_its_at_but_a_one_off_that_passed_is_refused() -> None:
    for every in (None, WEEK):
        assert run_on_activation(AT, every, now=AT - DAY) == AT
    assert run_on_activation(AT, WEEK, now=AT) == AT  # due this instant
    assert run_on_activation(AT, WEEK, now=AT + DAY) == AT  # at once, then on its grid
    with pytest.raises(SchedulePassed) as passed:
        run_on_activation(AT, None, now=AT + timedelta(seconds=1))
    assert passed.value.due == AT


def test_a_one_off_due_this_instant_has_passed_on_activation_resume_and_edit_alike() -> None:
    """The three rules agree: a one-off not sent yet needs an `at` ahead of now (they disagreed:
    activation took `at` == now, resume and edit refused it)."""
    with pytest.raises(SchedulePassed):
        run_on_activation(AT, None, now=AT)
    with pytest.raises(SchedulePassed):
        run_on_resume(AT, None, pending=AT, started=False, now=AT)
    with pytest.raises(SchedulePassed):
        run_after_edit(AT, None, previous=Schedule(AT + DAY), pending=AT + DAY, started=False, now=AT)
    # A millisecond ahead is ahead, on all three.
    ahead = AT + timedelta(milliseconds=1)
    assert run_on_activation(ahead, None, now=AT) == ahead
    assert run_on_resume(ahead, None, pending=AT + DAY, started=False, now=AT) == ahead
    assert (
        run_after_edit(ahead, None, previous=Schedule(AT + DAY), pending=AT + DAY, started=False, now=AT)
        == ahead
    )
    # An edit that leaves a run due this instant where it was moves nothing: it still goes out.
    assert run_after_edit(AT, None, previous=Schedule(AT), pending=AT, started=False, now=AT) == AT


def test_upcoming_run_is_at_while_ahead_then_the_grid() -> None:
    assert upcoming_run(AT, WEEK, AT - DAY) == AT
    assert upcoming_run(AT, WEEK, AT) == AT + WEEK
    assert upcoming_run(AT, WEEK, AT + timedelta(days=20)) == AT + 3 * WEEK
    assert upcoming_run(AT, None, AT - DAY) == AT
    assert upcoming_run(AT, None, AT) is None


def test_quiet_hours_ending_in_the_repeated_autumn_hour_end_that_night() -> None:
    """New York's clocks go from 02:00 EDT back to 01:00 EST on 2026-11-01: 01:00-02:00 happens
    twice. A send at the second 01:10 inside a 22:00-01:30 window waits 20 minutes for the second
    01:30, not until 01:30 the next night."""
    ny = zone("America/New_York")
    quiet = QuietHours(time(22), time(1, 30))
    second_0110 = datetime(2026, 11, 1, 6, 10, tzinfo=UTC)
    assert second_0110.astimezone(ny).fold == 1
    assert quiet.window_end(second_0110, ny) == datetime(2026, 11, 1, 6, 30, tzinfo=UTC)
    # The first 01:10 (EDT) ends at the first 01:30, as before.
    assert quiet.window_end(datetime(2026, 11, 1, 5, 10, tzinfo=UTC), ny) == datetime(
        2026, 11, 1, 5, 30, tzinfo=UTC
    )
    # A delay until 01:30 from the first 01:40 (EDT) stops at the second 01:30, the next instant
    # the clock shows it.
    assert next_time_of_day(datetime(2026, 11, 1, 5, 40, tzinfo=UTC), time(1, 30), ny) == datetime(
        2026, 11, 1, 6, 30, tzinfo=UTC
    )
    # A time the spring jump skips (02:30 on 2026-03-08) still lands after the jump, never before it.
    assert next_time_of_day(datetime(2026, 3, 8, 6, 0, tzinfo=UTC), time(2, 30), ny) == datetime(
        2026, 3, 8, 7, 30, tzinfo=UTC
    )
