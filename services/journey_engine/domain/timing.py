"""Time in the customer's timezone: delays, quiet hours, calendar days for frequency caps."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.journey_engine.domain.definition import WEEKDAYS, DelayNode
from shared.contracts import storable


def zone(name: str | None, default: str = "UTC") -> ZoneInfo:
    for candidate in (name, default, "UTC"):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError, OSError, TypeError):  # OSError: a name too long
                continue
    return ZoneInfo("UTC")


def next_time_of_day(now: datetime, at: time, tz: ZoneInfo, weekdays: list[str] | None = None) -> datetime:
    """The first instant after `now` that is `at` local time on an allowed weekday."""
    local = now.astimezone(tz)
    allowed = set(weekdays) if weekdays else set(WEEKDAYS)
    for days_ahead in range(0, 8):
        day = local.date() + timedelta(days=days_ahead)
        if WEEKDAYS[day.weekday()] not in allowed:
            continue
        for candidate_utc in _instants(datetime.combine(day, at, tzinfo=tz), tz):
            if candidate_utc > now:
                return candidate_utc
    raise AssertionError("a week always contains an allowed weekday")


def _instants(local: datetime, tz: ZoneInfo) -> list[datetime]:
    """The instants (UTC, in order) that show `local` on the clock: two in the hour an autumn DST
    change repeats (else a quiet window ending at 01:30 held a send at the second 01:10 until the
    next night), one otherwise; a time skipped by a spring jump lands on a real instant through UTC."""
    first = local.replace(fold=0).astimezone(UTC)
    second = local.replace(fold=1).astimezone(UTC)
    # fold=1 names a second instant only where the wall time repeats: in a skipped hour it maps to an
    # earlier instant whose clock shows another time.
    repeated = second > first and second.astimezone(tz).replace(tzinfo=None, fold=0) == local.replace(
        tzinfo=None, fold=0
    )
    return [first, second] if repeated else [first]


def parse_instant(value: object, tz: ZoneInfo) -> datetime | None:
    """A trait holding a date (`2026-02-01`) or a datetime; dates are midnight in the customer's zone.
    None when it holds none, or one outside 1900-2999 (`storable.time_in_range`): a placeholder such
    as 9999-12-31 would overflow the arithmetic, and no customer waits for it."""
    if isinstance(value, datetime):
        parsed = value if value.tzinfo else value.replace(tzinfo=tz)
    elif isinstance(value, str):
        try:
            if len(value) == 10:
                parsed = datetime.combine(date.fromisoformat(value), time(0), tzinfo=tz)
            else:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=tz)
    else:
        return None
    return parsed if storable.time_in_range(parsed) else None


def delay_until(
    node: DelayNode, now: datetime, tz: ZoneInfo, traits: dict[str, object]
) -> tuple[datetime, str]:
    """When a delay node lets the customer go on, and a sentence saying why."""
    if node.duration is not None:
        return now + node.duration, f"waits {node.duration}"
    if node.until_time is not None:
        due = next_time_of_day(now, node.until_time, tz, list(node.weekdays) if node.weekdays else None)
        days = ",".join(node.weekdays) if node.weekdays else "any day"
        return due, f"waits until {node.until_time.isoformat('minutes')} {tz.key} ({days})"
    assert node.until_trait is not None
    base = parse_instant(traits.get(node.until_trait), tz)
    if base is None:
        return now, f"trait '{node.until_trait}' holds no date: continues now"
    due = base + node.offset
    if due <= now:
        return now, f"{node.until_trait} + {node.offset} has passed: continues now"
    return due.astimezone(UTC), f"waits until {node.until_trait} + {node.offset}"


@dataclass(frozen=True)
class QuietHours:
    """A daily window in the customer's local time (may span midnight), e.g. 21:00-08:00."""

    start: time
    end: time

    def contains(self, local: time) -> bool:
        if self.start <= self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def window_end(self, now: datetime, tz: ZoneInfo) -> datetime | None:
        """When the quiet window around `now` ends, or None if `now` is not quiet."""
        local = now.astimezone(tz)
        if not self.contains(local.time().replace(tzinfo=None)):
            return None
        return next_time_of_day(now, self.end, tz)


def next_run(run_at: datetime, every: timedelta | None, now: datetime) -> datetime | None:
    """A recurring broadcast's next run after `now` (runs missed while the engine was down are
    skipped, not caught up); None for a one-off, or one past 2999 (`storable.time_in_range`)."""
    if every is None or every <= timedelta(0):
        return None
    missed = max(0, (now - run_at) // every)
    try:
        following = run_at + every * (missed + 1)
    except OverflowError:
        return None
    return following if storable.time_in_range(following) else None


def upcoming_run(at: datetime, every: timedelta | None, now: datetime) -> datetime | None:
    """The run a schedule's definition says comes next: `at` while it is ahead, then a recurring
    schedule's first run after `now` (`next_run`: missed runs are skipped); None for a one-off whose
    time has passed."""
    return at if at > now else next_run(at, every, now)


class Schedule(NamedTuple):
    """A schedule entry's times: a one-off (`every` None) or a recurring broadcast."""

    at: datetime
    every: timedelta | None = None


class SchedulePassed(Exception):
    """A one-off broadcast that has not gone out, asked to go at a time that has passed (`due`)."""

    def __init__(self, due: datetime) -> None:
        super().__init__(due.isoformat())
        self.due = due


class RunInProgress(Exception):
    """A one-off broadcast being sent (since `run_at`), asked to go at a time ahead: once this run
    finished, the members it reached would get it a second time."""

    def __init__(self, run_at: datetime | None) -> None:
        super().__init__(run_at.isoformat() if run_at else "")
        self.run_at = run_at


def has_gone_out(schedule: Schedule | None, pending: datetime | None) -> bool:
    """Whether a live journey's schedule (`schedule`, None: it was no broadcast) has sent a run, from
    its next run (`pending`): a one-off's is cleared once sent, a recurring one's moves past `at`."""
    if schedule is None:
        return False
    if pending is None:
        return True
    return schedule.every is not None and pending > schedule.at


def run_after_edit(
    at: datetime,
    every: timedelta | None,
    *,
    previous: Schedule | None,
    pending: datetime | None,
    started: bool,
    now: datetime,
) -> datetime | None:
    """A live (active or paused) schedule's next run once its definition says `at`/`every`;
    `previous`: the version edited (None: not a broadcast), `pending`: its next run so far,
    `started`: whether that run has enrolled some members already.

    A run in progress finishes first (the next follows the new definition), but a one-off being sent
    is not given an `at` ahead (`RunInProgress`: it would go out twice). Otherwise the run moves to
    an `at` ahead, or a recurring schedule's first run after now on its new grid (a run due now still
    goes out). A one-off's `at` that has passed: one sent already is not sent again, a recurring
    schedule made a one-off runs no more, one not sent yet cannot be moved into the past, nor a
    journey that was no broadcast given a time that has passed (`SchedulePassed`)."""
    if started:
        one_off_again = every is None and at > now and previous is not None and previous.every is None
        if one_off_again:
            raise RunInProgress(pending)
        return pending
    if at > now:
        return at
    if every is not None:
        return pending if pending is not None and pending <= now else next_run(at, every, now)
    if has_gone_out(previous, pending):
        return None
    if pending is not None and pending == at:
        return pending  # due now, as it was
    raise SchedulePassed(at)


def run_on_activation(at: datetime, every: timedelta | None, *, now: datetime) -> datetime:
    """A draft schedule's first run when it is activated: `at` (a recurring schedule whose `at` has
    passed runs at once, then on its grid). A one-off's `at` must be ahead of now, as on resume and
    edit: one that has passed, or is due this instant, is refused (`SchedulePassed`). With
    `local_time` too: `at` is when the run enrols its members, whatever their times of day."""
    if every is None and at <= now:
        raise SchedulePassed(at)
    return at


def run_on_resume(
    at: datetime, every: timedelta | None, *, pending: datetime | None, started: bool, now: datetime
) -> datetime | None:
    """A paused schedule's next run when it is activated again (arguments as for `run_after_edit`).

    A run in progress goes on where it stopped. Otherwise the next run is what the definition says,
    not `pending` (a replica of an earlier release left it at its old time when it saved an edit):
    `at` while ahead; a recurring schedule skips what it missed, as when the engine was down, to its
    first run after `now`; a one-off whose `at` has passed stays done if it went out (no run left),
    and is refused if not (`SchedulePassed`), not sent late at once."""
    if started:
        return pending
    if at > now:
        return at
    if every is not None:
        return next_run(at, every, now)
    if pending is None:
        return None
    raise SchedulePassed(at)


def local_day(instant: datetime, tz: ZoneInfo) -> date:
    return instant.astimezone(tz).date()
