"""A back-fill chunk that fails: counted on its segment as a failure when the segment is the cause, in
a row; passing causes and outages as stalls, backed off longer each time, failing it at a higher
limit; recorded in the chunk's own transaction; a failed pass retried from where it stopped;
failures charged to an earlier pass (kept by an older replica's restart) disregarded; stored
definitions that no longer validate marked `failed`."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError
from sqlalchemy import text

from services.segmenter.reevaluation import SegmentCatalogCache
from services.segmenter.schedules import Backfill, conflict_pause_s
from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import segments as segment_store
from tests.segmenter.conftest import ADMIN, Harness, make_event
from tests.segmenter.test_segments_api import seed

EVERYONE = {"trait": "plan", "op": "exists"}
PRO = {"trait": "plan", "op": "equals", "value": "pro"}


def failures(outcome: str) -> float:
    return REGISTRY.get_sample_value("clm_segmenter_backfill_failures_total", {"outcome": outcome}) or 0.0


async def sql(h: Harness, statement: str, **params: Any) -> None:
    async with h.segmenter.platform.engine.begin() as conn:
        await conn.execute(text(statement), params)


async def refuse(
    h: Harness, segment_id: str, sqlstate: str, customer: str = "", sleep: float = 0, times: int = 0
) -> None:
    """Every chunk of the segment writing a membership (of `customer`, or anyone) fails with `sqlstate`,
    as PostgreSQL would raise it (after `sleep` seconds); only the first `times` such writes if set.
    Each such write is counted (`refusals`)."""
    await sql(h, "CREATE SEQUENCE IF NOT EXISTS refused_writes")
    await sql(
        h,
        f"""CREATE OR REPLACE FUNCTION refuse_membership(seg text, cust text) RETURNS boolean
        LANGUAGE plpgsql AS $$
        DECLARE
            n bigint;
        BEGIN
            IF seg = '{segment_id}' AND ('{customer}' = '' OR cust = '{customer}') THEN
                n := nextval('refused_writes');
                IF {times} = 0 OR n <= {times} THEN
                    PERFORM pg_sleep({sleep});
                    RAISE EXCEPTION 'refused for the test' USING ERRCODE = '{sqlstate}';
                END IF;
            END IF;
            RETURN true;
        END $$""",
    )
    await sql(
        h,
        "ALTER TABLE memberships ADD CONSTRAINT refused CHECK (refuse_membership(segment_id, customer_id))",
    )


async def allow(h: Harness) -> None:
    await sql(h, "ALTER TABLE memberships DROP CONSTRAINT refused")


async def refusals(h: Harness) -> int:
    """How many writes `refuse` has looked at (a sequence: not rolled back with the chunk)."""
    async with h.segmenter.platform.engine.connect() as conn:
        n = await conn.scalar(
            text("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM refused_writes")
        )
    return int(n)


async def refuse_progress(h: Harness, segment_id: str, sqlstate: str, times: int = 0) -> None:
    """Every chunk of the segment fails with `sqlstate` as it records its progress, after its
    statement wrote the memberships and their announcements in the same transaction; only the first
    `times` such chunks if set. Counted as `refuse` counts (`refusals`)."""
    await sql(h, "CREATE SEQUENCE IF NOT EXISTS refused_writes")
    await sql(
        h,
        f"""CREATE OR REPLACE FUNCTION refuse_progress() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            n bigint;
        BEGIN
            n := nextval('refused_writes');
            IF {times} = 0 OR n <= {times} THEN
                RAISE EXCEPTION 'refused for the test' USING ERRCODE = '{sqlstate}';
            END IF;
            RETURN NEW;
        END $$""",
    )
    await sql(
        h,
        f"""CREATE TRIGGER refused_progress BEFORE UPDATE ON segments FOR EACH ROW
        WHEN (NEW.segment_id = '{segment_id}' AND NEW.backfill_cursor IS NOT NULL
              AND NEW.backfill_cursor IS DISTINCT FROM OLD.backfill_cursor)
        EXECUTE FUNCTION refuse_progress()""",
    )


def record_pauses(
    h: Harness, during: Callable[[float], Awaitable[None]] | None = None
) -> tuple[list[float], list[tuple[float, float]]]:
    """The worker's pauses between conflicting tries, as asked for (none waited: `during` runs in
    each instead), and the ranges its jitter was asked to draw from (it draws their middle)."""
    pauses: list[float] = []
    ranges: list[tuple[float, float]] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)
        if during is not None:
            await during(seconds)

    def jitter(low: float, high: float) -> float:
        ranges.append((low, high))
        return (low + high) / 2

    h.segmenter.backfill.pause, h.segmenter.backfill.jitter = pause, jitter
    return pauses, ranges


def announced(messages: list[dict[str, Any]], segment_id: str) -> Counter[tuple[str, str]]:
    """How many times each (customer, change) of the segment was announced."""
    return Counter((m["customer_id"], m["change"]) for m in messages if m["segment_id"] == segment_id)


async def view(h: Harness, segment_id: str) -> dict[str, Any]:
    r = await h.client.get(f"/v1/segments/{segment_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def create(h: Harness, definition: Any, name: str = "s") -> str:
    r = await h.client.post("/v1/segments", json={"name": name, "definition": definition}, headers=ADMIN)
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid


@pytest.mark.parametrize(
    ("sqlstate", "error"),
    [
        ("57014", "QueryCanceledError"),  # statement timeout
        ("25006", "ReadOnlySQLTransactionError"),  # a connection to the former primary
        ("53100", "DiskFullError"),
        ("53200", "OutOfMemoryError"),
        ("55P03", "LockNotAvailableError"),  # lock timeout
    ],
)
async def test_a_passing_cause_is_a_stall_backed_off_longer_each_time(
    harness: Harness, sqlstate: str, error: str
) -> None:
    """These say little about the segment: counted, three of them (over hours of a 10M-customer pass)
    failed it for good. Each is a stall, not a failure: it backs the segment off, 60 s, then twice as
    long each time in a row."""
    await seed(harness, 4)
    sid = await create(harness, EVERYONE)
    await refuse(harness, sid, sqlstate)
    backed_off = failures("backed_off")
    for stalls in range(1, 6):
        assert await harness.segmenter.backfill.run_once()
        v = await view(harness, sid)
        assert v["status"] == "backfilling", v
        assert (v["backfill"]["failures"], v["backfill"]["stalls"]) == (0, stalls), v
        assert v["backfill"]["error"] == f"{error}: refused for the test"
        assert v["backfill"]["failed_at"] == harness.clock.now().isoformat().replace("+00:00", "Z")
        harness.clock.advance(timedelta(seconds=60 * 2 ** (stalls - 1) - 1))
        assert not await harness.segmenter.backfill.run_once()  # backed off
        harness.clock.advance(timedelta(seconds=1))
    assert failures("backed_off") - backed_off == 5
    await allow(harness)
    await harness.segmenter.backfill.run_until_idle()
    v = await view(harness, sid)
    assert v["status"] == "ready" and v["member_count"] == 4
    assert (v["backfill"]["failures"], v["backfill"]["stalls"]) == (0, 0)
    assert (v["backfill"]["error"], v["backfill"]["failed_at"]) == (None, None)


async def stall(h: Harness, sqlstate: str) -> None:
    """One chunk that fails with `sqlstate`: a passing cause, or an outage (raised)."""
    if sqlstate.startswith("57P"):
        with pytest.raises(Exception, match="refused for the test"):
            await h.segmenter.backfill.run_once()
    else:
        assert await h.segmenter.backfill.run_once()


@pytest.mark.parametrize("sqlstate", ["57014", "57P01"])  # statement timeout; the server going away
async def test_a_chunk_that_stalls_every_time_fails_its_segment_at_the_stall_limit(
    harness: Harness, sqlstate: str
) -> None:
    """A chunk that always outlasts the statement timeout, or whose query gets its backend killed
    (the OOM killer: the whole server resets), was backed off a minute and run again, for ever: the
    segment stayed `backfilling`, the full timeout burnt each time, nothing said it never would be
    done. It backs off twice as long each time (at most an hour) and is `failed` at the tenth."""
    await seed(harness, 3)
    sid = await create(harness, EVERYONE)
    await refuse(harness, sid, sqlstate)
    failed = failures("failed")
    waits = []
    for stalls in range(1, 10):
        await stall(harness, sqlstate)
        v = await view(harness, sid)
        assert v["status"] == "backfilling" and v["backfill"]["stalls"] == stalls, v
        wait = min(60 * 2 ** (stalls - 1), 3600)
        harness.clock.advance(timedelta(seconds=wait - 1))
        assert not await harness.segmenter.backfill.run_once()  # backed off
        harness.clock.advance(timedelta(seconds=1))
        waits.append(wait)
    assert waits == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]
    await stall(harness, sqlstate)
    v = await view(harness, sid)
    assert v["status"] == "failed" and (v["backfill"]["failures"], v["backfill"]["stalls"]) == (0, 10), v
    assert v["backfill"]["error"].endswith(": refused for the test")
    assert failures("failed") - failed == 1
    harness.clock.advance(timedelta(days=1))
    assert not await harness.segmenter.backfill.run_once()  # failed: no longer tried

    await allow(harness)
    r = await harness.client.post(f"/v1/segments/{sid}/backfill/retry", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert (r.json()["backfill"]["stalls"], r.json()["backfill"]["error"]) == (0, None)
    await harness.segmenter.backfill.run_until_idle()
    assert (await view(harness, sid))["status"] == "ready"


async def test_a_chunk_that_goes_through_clears_the_stalls_and_their_back_off(harness: Harness) -> None:
    """Stalls count in a row on one cursor: progress in between starts them, and the back-off, over."""
    await seed(harness, 6)
    harness.segmenter.settings.backfill_chunk_size = 2
    harness.segmenter.settings.backfill_max_stalls = 3
    sid = await create(harness, EVERYONE)
    assert await harness.segmenter.backfill.run_once()  # u00, u01
    for customer in ["u02", "u04"]:
        await refuse(harness, sid, "57014", customer)
        for wait in (60, 120):  # two stalls of three, backed off longer the second time
            assert await harness.segmenter.backfill.run_once()
            harness.clock.advance(timedelta(seconds=wait - 1))
            assert not await harness.segmenter.backfill.run_once()
            harness.clock.advance(timedelta(seconds=1))
        v = await view(harness, sid)
        assert v["status"] == "backfilling" and v["backfill"]["stalls"] == 2, v
        await allow(harness)
        assert await harness.segmenter.backfill.run_once()  # through
        v = await view(harness, sid)
        assert (v["backfill"]["stalls"], v["backfill"]["error"], v["backfill"]["failed_at"]) == (
            0,
            None,
            None,
        )
    await harness.segmenter.backfill.run_until_idle()
    v = await view(harness, sid)
    assert v["status"] == "ready" and v["member_count"] == 6


async def test_failures_count_in_a_row_a_chunk_that_goes_through_clears_them(harness: Harness) -> None:
    """Three failed chunks over a whole pass, each followed by good ones, failed it: a pass of hours
    meets a few. Failures count in a row now."""
    await seed(harness, 8)
    harness.segmenter.settings.backfill_chunk_size = 2
    sid = await create(harness, EVERYONE)
    assert await harness.segmenter.backfill.run_once()  # u00, u01
    for i, customer in enumerate(["u02", "u04", "u06"]):
        await refuse(harness, sid, "23514", customer)  # a check violation: the segment's own failure
        assert await harness.segmenter.backfill.run_once()
        v = await view(harness, sid)
        assert v["status"] == "backfilling" and v["backfill"]["failures"] == 1, (customer, v)
        assert v["backfill"]["processed"] == 2 * (i + 1) and "refused" in v["backfill"]["error"]
        await allow(harness)
        harness.clock.advance(timedelta(seconds=60))
        assert await harness.segmenter.backfill.run_once()  # the failed chunk, now through
        v = await view(harness, sid)
        assert v["backfill"]["processed"] == 2 * (i + 2)
        assert (v["backfill"]["failures"], v["backfill"]["error"], v["backfill"]["failed_at"]) == (
            0,
            None,
            None,
        )
    await harness.segmenter.backfill.run_until_idle()
    v = await view(harness, sid)
    assert v["status"] == "ready" and v["member_count"] == 8 and v["backfill"]["processed"] == 8


async def test_a_failed_segment_is_retried_from_where_it_stopped(harness: Harness) -> None:
    """The only way out was saving it again, which starts over from the first customer."""
    await seed(harness, 6)
    harness.segmenter.settings.backfill_chunk_size = 2
    ready = await harness.create_segment(PRO, "Pro")
    sid = await create(harness, EVERYONE)
    await refuse(harness, sid, "23514", "u02")
    assert await harness.segmenter.backfill.run_once()  # u00, u01
    for _ in range(3):
        assert await harness.segmenter.backfill.run_once()
        harness.clock.advance(timedelta(seconds=60))
    failed = await view(harness, sid)
    assert failed["status"] == "failed" and failed["backfill"]["failures"] == 3
    assert failed["backfill"]["processed"] == 2
    assert not await harness.segmenter.backfill.run_once()

    # Not while it is done, nor for what does not exist, nor without the admin token.
    r = await harness.client.post(f"/v1/segments/{ready}/backfill/retry", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"] == "backfill_not_failed", r.text
    r = await harness.client.post("/v1/segments/seg_nope/backfill/retry", headers=ADMIN)
    assert r.status_code == 404
    assert (await harness.client.post(f"/v1/segments/{sid}/backfill/retry")).status_code == 401

    await allow(harness)
    r = await harness.client.post(f"/v1/segments/{sid}/backfill/retry", headers=ADMIN)
    assert r.status_code == 200, r.text
    retried = r.json()
    assert retried["status"] == "backfilling" and retried["version"] == failed["version"]
    assert retried["backfill"]["processed"] == 2
    assert retried["backfill"]["started_at"] == failed["backfill"]["started_at"]
    assert (retried["backfill"]["failures"], retried["backfill"]["error"]) == (0, None)
    assert await harness.segmenter.backfill.run_once()  # at once: no back-off left
    assert (await view(harness, sid))["backfill"]["processed"] == 4  # u02, u03: the chunk that failed
    await harness.segmenter.backfill.run_until_idle()
    v = await view(harness, sid)
    assert v["status"] == "ready" and v["backfill"]["processed"] == 6 and v["member_count"] == 6


async def test_failures_recorded_before_the_pass_started_are_disregarded(harness: Harness) -> None:
    """An older replica (during a rollout) restarts a pass without knowing the failure columns: a
    failed segment saved again through it kept its count and error, and failed at its first failure."""
    await seed(harness, 3)
    sid = await create(harness, EVERYONE)
    await refuse(harness, sid, "23514")
    for _ in range(3):
        assert await harness.segmenter.backfill.run_once()
        harness.clock.advance(timedelta(seconds=60))
    assert (await view(harness, sid))["status"] == "failed"
    # Saved again as the release before this one did it.
    await sql(
        harness,
        "UPDATE segments SET version = version + 1, status = 'backfilling', backfill_cursor = NULL, "
        "backfill_done = 0, backfill_started_at = :now, backfill_finished_at = NULL, updated_at = :now "
        "WHERE segment_id = :s",
        s=sid,
        now=harness.clock.now(),
    )
    v = await view(harness, sid)
    assert v["status"] == "backfilling"
    assert (v["backfill"]["failures"], v["backfill"]["error"], v["backfill"]["failed_at"]) == (0, None, None)
    assert await harness.segmenter.backfill.run_once()  # claimed at once: no back-off from before
    v = await view(harness, sid)
    assert v["status"] == "backfilling" and v["backfill"]["failures"] == 1


async def test_a_failure_is_charged_to_its_pass_whatever_the_replicas_clocks_say(harness: Harness) -> None:
    """Whether a failure was the current pass's was read from `failed_at >= started_at`, two replicas'
    clocks (and the worker's `now` is taken before its claim): a restart by a replica whose clock is
    behind the worker's kept the earlier pass's failure (counted, backed off), and a failure of the
    new pass by a worker whose clock is behind the restarter's was disregarded (never backed off,
    never counted)."""
    await seed(harness, 3)
    sid = await create(harness, EVERYONE)
    await refuse(harness, sid, "23514")
    assert await harness.segmenter.backfill.run_once()
    assert (await view(harness, sid))["backfill"]["failures"] == 1
    # Saved again through an older release (which leaves the failure columns as they are), on a
    # replica whose clock is 5 s behind the worker's.
    await sql(
        harness,
        "UPDATE segments SET version = version + 1, backfill_cursor = NULL, backfill_done = 0, "
        "backfill_started_at = :then, updated_at = :then WHERE segment_id = :s",
        s=sid,
        then=harness.clock.now() - timedelta(seconds=5),
    )
    v = await view(harness, sid)
    assert (v["backfill"]["failures"], v["backfill"]["error"], v["backfill"]["failed_at"]) == (0, None, None)
    assert await harness.segmenter.backfill.run_once()  # not backed off by the earlier pass's failure
    assert (await view(harness, sid))["backfill"]["failures"] == 1  # this pass's first, not the second
    # Restarted by a replica whose clock is 30 s ahead of the worker's (or whose restart committed
    # between the worker reading its clock and claiming the segment): the new pass's failure is its.
    async with harness.segmenter.platform.unit_of_work() as uow:
        await segment_store.restart_backfill(uow.session, [sid], harness.clock.now() + timedelta(seconds=30))
    harness.clock.advance(timedelta(seconds=1))
    assert await harness.segmenter.backfill.run_once()
    v = await view(harness, sid)
    assert v["status"] == "backfilling" and v["backfill"]["failures"] == 1, v
    assert v["backfill"]["failed_at"] == harness.clock.now().isoformat().replace("+00:00", "Z")
    assert not await harness.segmenter.backfill.run_once()  # backed off
    for _ in range(2):
        harness.clock.advance(timedelta(seconds=60))
        assert await harness.segmenter.backfill.run_once()
    assert (await view(harness, sid))["status"] == "failed"


async def test_an_outage_after_the_claim_backs_the_segment_off_so_others_get_their_turn(
    harness: Harness,
) -> None:
    """A chunk whose statement kills its backend, or that a proxy cuts, is an outage (raised, not
    counted): the segment stayed first by its edit time, and no other was back-filled."""
    await seed(harness, 3)
    stuck = await create(harness, EVERYONE, "Stuck")
    harness.clock.advance(timedelta(seconds=1))
    pro = await create(harness, PRO, "Pro")
    await refuse(harness, stuck, "57P01")  # as the server shutting the connection down says it
    backed_off = failures("backed_off")
    with pytest.raises(Exception, match="refused for the test"):
        await harness.segmenter.backfill.run_once()
    v = await view(harness, stuck)
    assert v["status"] == "backfilling" and (v["backfill"]["failures"], v["backfill"]["stalls"]) == (0, 1)
    assert v["backfill"]["error"] == "AdminShutdownError: refused for the test"
    assert failures("backed_off") - backed_off == 1
    await harness.segmenter.backfill.run_until_idle()
    assert (await view(harness, pro))["status"] == "ready"
    await allow(harness)
    harness.clock.advance(timedelta(seconds=60))
    await harness.segmenter.backfill.run_until_idle()
    assert (await view(harness, stuck))["status"] == "ready"


async def test_a_failure_is_recorded_while_the_chunk_still_holds_the_segment(harness: Harness) -> None:
    """It was recorded in a transaction of its own after the chunk's had let the row go: a restart
    that waited for the row (a segment it refers to finishing its pass) got the stale failure, and
    another replica could re-run the chunk in between."""
    await seed(harness, 3)
    sid = await create(harness, EVERYONE)
    await refuse(harness, sid, "23514", sleep=0.5)
    chunk = asyncio.create_task(harness.segmenter.backfill.run_once())
    await asyncio.sleep(0.2)  # the chunk holds the row

    async def restart() -> None:
        async with harness.segmenter.platform.unit_of_work() as uow:
            await segment_store.restart_backfill(uow.session, [sid], harness.clock.now())

    await asyncio.gather(chunk, restart())
    v = await view(harness, sid)
    assert v["status"] == "backfilling"
    assert (v["backfill"]["failures"], v["backfill"]["error"], v["backfill"]["failed_at"]) == (0, None, None)


async def test_a_ready_segment_whose_stored_definition_no_longer_validates_is_failed(
    harness: Harness,
) -> None:
    """The catalogue left it out with a log line: `ready`, it looked up to date while nothing updated
    it. Explain answered 500, and it could lose a segment it depends on (deletion skipped it)."""
    await seed(harness, 3)
    pro = await harness.create_segment(PRO, name="Pro")
    sid = await harness.create_segment({"or": [{"member_of": pro}, {"trait": "d", "op": "exists"}]})
    assert (await view(harness, sid))["status"] == "ready"
    # As a release that accepted it stored it: in UTC this is year 10000.
    await sql(
        harness,
        "UPDATE segments SET definition = jsonb_set(definition, '{or,1}', "
        """'{"trait": "d", "op": "before", "value": "9999-12-31T23:59:59-01:00"}'), """
        "version = version + 1 WHERE segment_id = :s",
        s=sid,
    )
    failed = failures("failed")
    await harness.send(make_event("x1", "identify", user_id="u00", traits={"plan": "free"}))
    await harness.processed(1)  # real time leaves it out, the batch goes through
    assert await harness.segmenter.backfill.run_once()  # marked failed
    v = await view(harness, sid)
    assert v["status"] == "failed" and v["backfill"]["failures"] == 1
    assert v["backfill"]["error"] == (
        "InvalidRule: definition.or[1].value: must be from 0001-01-01 to 9999-12-31 in UTC"
    )
    assert failures("failed") - failed == 1
    assert not await harness.segmenter.backfill.run_once()  # once
    assert (await view(harness, pro))["status"] == "ready"

    r = await harness.client.get(f"/v1/segments/{sid}/explain/u00", headers=ADMIN)
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "invalid_stored_definition"
    assert r.json()["errors"] == [
        {
            "field": "definition.or[1].value",
            "rule": "range",
            "message": "must be from 0001-01-01 to 9999-12-31 in UTC",
        }
    ]
    r = await harness.client.post(f"/v1/segments/{sid}/backfill/retry", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"] == "invalid_stored_definition", r.text
    # What it refers to cannot be deleted under it, nor made to refer to it in turn.
    r = await harness.client.put(
        f"/v1/segments/{pro}",
        json={"name": "Pro", "definition": {"or": [PRO, {"member_of": sid}]}},
        headers=ADMIN,
    )
    assert r.status_code == 400, r.text
    assert r.json()["errors"] == [
        {"field": "definition.or[1].member_of", "rule": "cycle", "message": f"{pro} -> {sid} -> {pro}"}
    ]
    r = await harness.client.delete(f"/v1/segments/{pro}", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"] == "segment_in_use", r.text
    # Saved again, valid: back to work.
    r = await harness.client.put(
        f"/v1/segments/{sid}",
        json={
            "name": "s",
            "definition": {"or": [{"member_of": pro}, {"trait": "d", "op": "before", "value": "9999-12-31"}]},
        },
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "backfilling" and r.json()["backfill"]["error"] is None
    await harness.segmenter.backfill.run_until_idle()
    assert (await view(harness, sid))["status"] == "ready"


@pytest.mark.parametrize(
    ("sqlstate", "error"), [("40P01", "DeadlockDetectedError"), ("40001", "SerializationError")]
)
async def test_a_chunk_that_conflicts_every_time_is_a_stall_backed_off_then_failed(
    harness: Harness, sqlstate: str, error: str
) -> None:
    """A deadlock or serialization failure was raised, recorded nowhere, and the chunk run again a
    second later, without limit: a chunk that deadlocked every time (against a steady real-time
    writer) re-ran its whole statement for ever. It is tried `backfill_conflict_tries` times in a
    row, then it is a stall like a statement timeout: backed off longer each time, `failed` at the
    stall limit, never counted as the segment's own failure."""
    settings = harness.segmenter.settings
    settings.backfill_max_stalls = 3
    tries = settings.backfill_conflict_tries
    assert tries == 4  # the default
    pauses, _ = record_pauses(harness)
    await seed(harness, 4)
    sid = await create(harness, EVERYONE)
    await refuse(harness, sid, sqlstate)
    conflicts, backed_off, failed = failures("conflict"), failures("backed_off"), failures("failed")
    for stalls, wait in ((1, 60), (2, 120)):
        assert await harness.segmenter.backfill.run_once()  # no exception: the tries, then a stall
        assert await refusals(harness) == tries * stalls
        v = await view(harness, sid)
        assert v["status"] == "backfilling", v
        assert (v["backfill"]["failures"], v["backfill"]["stalls"]) == (0, stalls), v
        assert v["backfill"]["error"] == f"{error}: refused for the test"
        harness.clock.advance(timedelta(seconds=wait - 1))
        assert not await harness.segmenter.backfill.run_once()  # backed off: not even tried
        assert await refusals(harness) == tries * stalls
        harness.clock.advance(timedelta(seconds=1))
    assert await harness.segmenter.backfill.run_once()
    v = await view(harness, sid)
    assert v["status"] == "failed" and (v["backfill"]["failures"], v["backfill"]["stalls"]) == (0, 3), v
    assert await refusals(harness) == 3 * tries
    assert failures("conflict") - conflicts == 3 * (tries - 1)
    assert pauses == 3 * [pytest.approx(0.75 * 0.05 * 2**i) for i in range(tries - 1)]
    assert (failures("backed_off") - backed_off, failures("failed") - failed) == (2, 1)
    harness.clock.advance(timedelta(days=1))
    assert not await harness.segmenter.backfill.run_once()
    assert await refusals(harness) == 3 * tries

    await allow(harness)
    r = await harness.client.post(f"/v1/segments/{sid}/backfill/retry", headers=ADMIN)
    assert r.status_code == 200, r.text
    await harness.segmenter.backfill.run_until_idle()
    v = await view(harness, sid)
    assert v["status"] == "ready" and v["member_count"] == 4


async def test_a_conflict_that_passes_within_the_tries_is_tried_again_after_a_pause(harness: Harness) -> None:
    """The tries are paused (jittered, doubling from `backfill_conflict_pause_s`), holding no lock and
    keeping nothing the conflicting try wrote (its memberships, their announcements), and a chunk that
    goes through on a later one records nothing and announces each change once."""
    settings = harness.segmenter.settings
    settings.backfill_conflict_pause_s = 0.04
    await seed(harness, 3)
    sid = await create(harness, EVERYONE)
    # After the chunk's statement wrote its memberships and announcements: they go with the try.
    await refuse_progress(harness, sid, "40P01", times=2)
    checked: list[float] = []

    async def during(seconds: float) -> None:
        async with harness.segmenter.platform.engine.begin() as conn:
            kept = await conn.scalar(
                text("SELECT count(*) FROM memberships WHERE segment_id = :s"), {"s": sid}
            )
            assert kept == 0  # the try's writes were rolled back with it
            # No lock held: a writer (an edit, a real-time unit) takes the row at once.
            taken = await conn.execute(
                text("SELECT 1 FROM segments WHERE segment_id = :s FOR NO KEY UPDATE NOWAIT"), {"s": sid}
            )
            assert taken.first() is not None
        checked.append(seconds)

    pauses, ranges = record_pauses(harness, during)
    conflicts, backed_off = failures("conflict"), failures("backed_off")
    assert await harness.segmenter.backfill.run_once()
    assert pauses == [pytest.approx(0.75 * 0.04), pytest.approx(0.75 * 0.08)] and checked == pauses
    assert ranges == [(0.5, 1.0), (0.5, 1.0)]  # half to all of 0.04, then of 0.08
    assert await refusals(harness) == 3  # two refused, the third went through
    assert (failures("conflict") - conflicts, failures("backed_off") - backed_off) == (2, 0)
    v = await view(harness, sid)
    assert v["backfill"]["processed"] == 3
    assert (v["backfill"]["stalls"], v["backfill"]["error"], v["backfill"]["failed_at"]) == (0, None, None)
    await harness.segmenter.backfill.run_until_idle()
    v = await view(harness, sid)
    assert v["status"] == "ready" and v["member_count"] == 3
    assert announced(await harness.memberships(), sid) == {
        ("u00", "entered"): 1,
        ("u01", "entered"): 1,
        ("u02", "entered"): 1,
    }


async def test_a_conflict_on_every_try_after_the_chunks_writes_announces_nothing_until_it_goes_through(
    harness: Harness,
) -> None:
    """Each try wrote memberships and announcements before its conflict: none is kept, the stall is
    recorded, and the chunk that goes through later announces each change once."""
    await seed(harness, 4)
    sid = await create(harness, EVERYONE)
    await refuse_progress(harness, sid, "40001")
    pauses, _ = record_pauses(harness)
    assert await harness.segmenter.backfill.run_once()
    assert await refusals(harness) == 4 and len(pauses) == 3
    v = await view(harness, sid)
    assert v["status"] == "backfilling" and v["backfill"]["stalls"] == 1 and v["backfill"]["processed"] == 0
    assert v["backfill"]["error"] == "SerializationError: refused for the test"
    assert await members(harness, sid) == []
    assert not announced(await harness.memberships(), sid)
    await sql(harness, "DROP TRIGGER refused_progress ON segments")
    harness.clock.advance(timedelta(seconds=60))
    await harness.segmenter.backfill.run_until_idle()
    assert (await view(harness, sid))["status"] == "ready"
    assert announced(await harness.memberships(), sid) == {(f"u0{i}", "entered"): 1 for i in range(4)}


async def test_conflicts_count_in_a_row_a_claim_that_finds_nothing_starts_them_over(
    harness: Harness,
) -> None:
    """The worker kept a count per segment it had met a conflict on, cleared only when that segment's
    chunk went through or stalled: a later conflict on it, however long after, was counted on top
    (stalled early), and segments edited or deleted meanwhile stayed in the count for good."""
    harness.segmenter.settings.backfill_conflict_tries = 2
    await seed(harness, 3)
    sid = await create(harness, EVERYONE)
    await refuse(harness, sid, "40P01")
    held: list[Any] = []

    async def during(_: float) -> None:
        if not held:  # another replica takes the segment meanwhile: the next claim finds nothing
            conn = await harness.segmenter.platform.engine.connect()
            await conn.begin()
            await conn.execute(
                text("SELECT 1 FROM segments WHERE segment_id = :s FOR NO KEY UPDATE"), {"s": sid}
            )
            held.append(conn)

    record_pauses(harness, during)
    assert not await harness.segmenter.backfill.run_once()  # one conflict, then nothing to claim
    assert await refusals(harness) == 1
    await held[0].rollback()
    await held[0].close()
    assert await harness.segmenter.backfill.run_once()  # two conflicts in a row now: a stall
    assert await refusals(harness) == 3  # not 2: the first did not count on top
    v = await view(harness, sid)
    assert (v["backfill"]["failures"], v["backfill"]["stalls"]) == (0, 1), v


def test_the_conflict_pause_doubles_up_to_a_second_and_its_settings_are_bounded() -> None:
    """2 ** (tries - 1) overflowed a float past ~1025 tries (the loop raised for ever); a first pause
    past the 1 s cap did not double, silently: both settings are bounded."""
    assert [conflict_pause_s(0.05, t) for t in (1, 2, 3, 5, 6)] == [0.05, 0.1, 0.2, 0.8, 1.0]
    assert conflict_pause_s(0.05, 5000) == 1.0 and conflict_pause_s(0.0, 5000) == 0.0
    for bad in ({"backfill_conflict_tries": 21}, {"backfill_conflict_tries": 0}):
        with pytest.raises(ValidationError, match="backfill_conflict_tries"):
            SegmenterSettings(**bad)
    with pytest.raises(ValidationError, match="backfill_conflict_pause_s"):
        SegmenterSettings(backfill_conflict_pause_s=1.5)
    bounds = SegmenterSettings(backfill_conflict_tries=20, backfill_conflict_pause_s=1.0)
    assert (bounds.backfill_conflict_tries, bounds.backfill_conflict_pause_s) == (20, 1.0)


async def test_a_conflict_past_the_chunks_savepoint_on_the_last_try_is_a_stall_too(harness: Harness) -> None:
    """The end of a pass restarts the segments built on it after the chunk's savepoint: a conflict
    there on the last try loses the transaction, and is recorded as a stall in one of its own."""
    record_pauses(harness)
    await seed(harness, 3)
    base = await harness.create_segment(EVERYONE, "Base")
    built = await harness.create_segment({"member_of": base}, "Built on it")
    r = await harness.client.put(
        f"/v1/segments/{base}", json={"name": "Base", "definition": PRO}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    assert await harness.segmenter.backfill.run_once()  # the chunk: u00..u02
    await sql(harness, "CREATE SEQUENCE refused_writes")
    await sql(
        harness,
        """CREATE FUNCTION refuse_restart() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM nextval('refused_writes');
            RAISE EXCEPTION 'refused for the test' USING ERRCODE = '40P01';
        END $$""",
    )
    await sql(
        harness,
        f"""CREATE TRIGGER refused BEFORE UPDATE ON segments FOR EACH ROW
        WHEN (NEW.segment_id = '{built}' AND OLD.status = 'ready' AND NEW.status = 'backfilling')
        EXECUTE FUNCTION refuse_restart()""",
    )
    backed_off = failures("backed_off")
    assert await harness.segmenter.backfill.run_once()  # the end of its pass, four times
    assert await refusals(harness) == 4
    assert failures("backed_off") - backed_off == 1
    v = await view(harness, base)
    assert v["status"] == "backfilling" and (v["backfill"]["failures"], v["backfill"]["stalls"]) == (0, 1)
    assert v["backfill"]["error"] == "DeadlockDetectedError: refused for the test"
    assert (await view(harness, built))["status"] == "ready"  # not restarted: rolled back
    assert not await harness.segmenter.backfill.run_once()  # backed off
    await sql(harness, "DROP TRIGGER refused ON segments")
    harness.clock.advance(timedelta(seconds=60))
    await harness.segmenter.backfill.run_until_idle()
    assert (await view(harness, base))["status"] == "ready"
    v = await view(harness, built)
    assert v["status"] == "ready" and v["member_count"] == 1  # u00 alone is pro


# Valid in this release; the same node with `9999-12-31T23:59:59-01:00` (year 10000 in UTC) is not,
# and stands for a definition only another release accepts.
VALID_LATER = {"or": [PRO, {"trait": "d", "op": "before", "value": "9999-12-31"}]}


async def store_definition(h: Harness, segment_id: str, date: str, *, new_version: bool) -> None:
    """Write the `or[1]` date of the stored definition as a release would have saved it, without
    starting a pass (`new_version`: as another release's save; else the same version, as it reads to
    a release whose rules differ)."""
    await sql(
        h,
        "UPDATE segments SET definition = jsonb_set(definition, '{or,1,value}', to_jsonb(CAST(:d AS text)))"
        + (", version = version + 1" if new_version else "")
        + " WHERE segment_id = :s",
        d=date,
        s=segment_id,
    )


async def members(h: Harness, segment_id: str) -> list[str]:
    r = await h.client.get(f"/v1/segments/{segment_id}/members", headers=ADMIN)
    assert r.status_code == 200, r.text
    ids: list[str] = r.json()["members"]
    return ids


async def identify(h: Harness, message_id: str, user_id: str, plan: str) -> None:
    event = make_event(message_id, "identify", user_id=user_id, traits={"plan": plan})
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(uow, [event])


async def test_a_segment_failed_for_its_stored_definition_is_back_filled_again_once_it_validates(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Saved by a newer release, failed by an older one after a rollback: it stayed `failed` for ever
    after an upgrade that accepts it again, unless someone retried it or saved it. A worker of a
    release that accepts it back-fills it again by itself (at start, then every
    `backfill_invalid_recheck_s`), from the first customer: real time skipped it meanwhile."""
    await seed(harness, 6)  # u00 and u03 are pro
    harness.segmenter.settings.backfill_chunk_size = 2
    sid = await create(harness, VALID_LATER)
    assert await harness.segmenter.backfill.run_once()  # u00, u01
    assert await members(harness, sid) == ["u00"]
    # A newer release saved a definition this one (the harness's worker) refuses, then was rolled back.
    await store_definition(harness, sid, "9999-12-31T23:59:59-01:00", new_version=True)
    assert await harness.segmenter.backfill.run_once()
    v = await view(harness, sid)
    assert v["status"] == "failed" and v["backfill"]["error"].startswith(
        "InvalidRule: definition.or[1].value"
    )
    assert v["backfill"]["processed"] == 2
    # Meanwhile real time leaves it out: customers before its cursor change too.
    await identify(harness, "p1", "u00", "free")
    await identify(harness, "p2", "u01", "pro")
    assert await members(harness, sid) == ["u00"]
    before = announced(await harness.memberships(), sid)
    assert before == {("u00", "entered"): 1}
    harness.clock.advance(timedelta(seconds=harness.settings.backfill_invalid_recheck_s))
    assert not await harness.segmenter.backfill.run_once()  # still invalid to this release: stays failed
    assert (await view(harness, sid))["status"] == "failed"

    # A later release reads the same stored version and accepts it: its worker (a fresh process).
    await store_definition(harness, sid, "9999-12-31", new_version=False)
    upgraded = Backfill(
        harness.segmenter.platform, harness.clock, SegmentCatalogCache(), harness.segmenter.settings
    )
    with caplog.at_level(logging.WARNING, logger="services.segmenter.schedules"):
        assert await upgraded.run_once()  # at its first pass
    logged = [r for r in caplog.records if "validates again" in r.getMessage()]
    assert [
        (getattr(r, "segment_id", None), getattr(r, "version", None), getattr(r, "failed_at", None))
        for r in logged
    ] == [(sid, v["version"], v["backfill"]["failed_at"].replace("Z", "+00:00"))]
    resumed = await view(harness, sid)
    assert resumed["status"] == "backfilling" and resumed["version"] == v["version"]
    assert resumed["backfill"]["processed"] == 0  # from the first customer
    assert (resumed["backfill"]["failures"], resumed["backfill"]["error"]) == (0, None)

    # During the rollout a replica of the older release fails it again (after the later one's first
    # chunk, u00 and u01, announced their changes); the later one looks again
    # `backfill_invalid_recheck_s` later (not at every pass).
    assert await upgraded.run_once()
    assert (await view(harness, sid))["backfill"]["processed"] == 2
    assert await harness.segmenter.backfill.run_once()
    assert (await view(harness, sid))["status"] == "failed"
    assert not await upgraded.run_once()
    harness.clock.advance(timedelta(seconds=harness.settings.backfill_invalid_recheck_s - 1))
    assert not await upgraded.run_once()
    harness.clock.advance(timedelta(seconds=1))
    assert await upgraded.run_once()
    await upgraded.run_until_idle()
    v = await view(harness, sid)
    assert v["status"] == "ready" and v["backfill"]["processed"] == 6
    assert await members(harness, sid) == ["u01", "u03"]  # u00 left and u01 joined while it was failed
    # Each change announced once over both passes: u03, beyond the cursor, entering too.
    assert announced(await harness.memberships(), sid) - before == {
        ("u00", "exited"): 1,
        ("u01", "entered"): 1,
        ("u03", "entered"): 1,
    }


async def test_only_segments_failed_for_their_definition_are_taken_up_again(harness: Harness) -> None:
    """A segment failed for another cause stays `failed` until retried or saved again, however long,
    and so does one whose definition this release still refuses."""
    await seed(harness, 3)
    own = await create(harness, EVERYONE, "Own failure")
    await refuse(harness, own, "23514")
    for _ in range(3):
        assert await harness.segmenter.backfill.run_once()
        harness.clock.advance(timedelta(seconds=60))
    assert (await view(harness, own))["status"] == "failed"
    await allow(harness)
    invalid = await harness.create_segment(VALID_LATER, "Invalid")
    await store_definition(harness, invalid, "9999-12-31T23:59:59-01:00", new_version=True)
    assert await harness.segmenter.backfill.run_once()
    assert (await view(harness, invalid))["status"] == "failed"
    for worker in (
        harness.segmenter.backfill,
        Backfill(
            harness.segmenter.platform, harness.clock, SegmentCatalogCache(), harness.segmenter.settings
        ),
    ):
        for _ in range(2):
            harness.clock.advance(timedelta(days=1))
            assert not await worker.run_once()
    assert (await view(harness, own))["status"] == "failed"
    assert (await view(harness, invalid))["status"] == "failed"


async def test_retrying_a_segment_failed_for_its_definition_starts_a_new_pass(harness: Harness) -> None:
    """The retry went on from the cursor of a pass failed for its definition once it validated
    (repaired by hand, a later release): the customers before it, whom real time skipped
    meanwhile, kept their memberships from before."""
    await seed(harness, 6)
    harness.segmenter.settings.backfill_chunk_size = 2
    sid = await create(harness, VALID_LATER)
    assert await harness.segmenter.backfill.run_once()  # u00, u01
    await store_definition(harness, sid, "9999-12-31T23:59:59-01:00", new_version=True)
    assert await harness.segmenter.backfill.run_once()
    assert (await view(harness, sid))["status"] == "failed"
    await identify(harness, "p1", "u00", "free")
    r = await harness.client.post(f"/v1/segments/{sid}/backfill/retry", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"] == "invalid_stored_definition", r.text
    await store_definition(harness, sid, "9999-12-31", new_version=True)  # repaired in place
    r = await harness.client.post(f"/v1/segments/{sid}/backfill/retry", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "backfilling" and r.json()["backfill"]["processed"] == 0
    assert (r.json()["backfill"]["failures"], r.json()["backfill"]["error"]) == (0, None)
    await harness.segmenter.backfill.run_until_idle()
    v = await view(harness, sid)
    assert v["status"] == "ready" and v["backfill"]["processed"] == 6
    assert await members(harness, sid) == ["u03"]


async def fail_for_definition(h: Harness, *segment_ids: str) -> None:
    """As an older release after a rollback: the segments' stored definitions (saved by a newer one)
    do not validate, and it marks them `failed`."""
    for sid in segment_ids:
        await store_definition(h, sid, "9999-12-31T23:59:59-01:00", new_version=True)
    assert await h.segmenter.backfill.run_once()
    for sid in segment_ids:
        assert (await view(h, sid))["status"] == "failed"
    for sid in segment_ids:  # a release that accepts them reads the same stored versions
        await store_definition(h, sid, "9999-12-31", new_version=False)


def upgraded_worker(h: Harness) -> Backfill:
    """The back-fill worker of a release that accepts them (a fresh process)."""
    return Backfill(h.segmenter.platform, h.clock, SegmentCatalogCache(), h.segmenter.settings)


async def test_taking_failed_definitions_up_again_can_be_turned_off(harness: Harness) -> None:
    """0 looked at every pass: there was no way to leave such segments to an operator (a pass from
    the first customer announces every change since the segment failed)."""
    harness.settings.backfill_invalid_recheck_s = 0
    await seed(harness, 3)
    sid = await harness.create_segment(VALID_LATER)
    await fail_for_definition(harness, sid)
    upgraded = upgraded_worker(harness)
    for _ in range(3):
        assert not await upgraded.run_once()
        harness.clock.advance(timedelta(days=1))
    assert (await view(harness, sid))["status"] == "failed"
    # By hand instead: the retry starts from the first customer.
    r = await harness.client.post(f"/v1/segments/{sid}/backfill/retry", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "backfilling" and r.json()["backfill"]["processed"] == 0
    await upgraded.run_until_idle()
    assert (await view(harness, sid))["status"] == "ready"


async def test_a_look_that_failed_is_made_again_at_the_next_pass(harness: Harness) -> None:
    """The time of the look was noted before its query: one that failed (the database away, or any
    error) skipped the segments for `backfill_invalid_recheck_s` (300 s)."""
    await seed(harness, 3)
    sid = await harness.create_segment(VALID_LATER)
    await fail_for_definition(harness, sid)
    upgraded = upgraded_worker(harness)
    # The look's query fails (an error from PostgreSQL, as any there would).
    await sql(harness, "ALTER TABLE segments RENAME COLUMN backfill_failed_at TO failed_at_away")
    with pytest.raises(Exception, match="backfill_failed_at"):
        await upgraded.run_once()
    await sql(harness, "ALTER TABLE segments RENAME COLUMN failed_at_away TO backfill_failed_at")
    assert await upgraded.run_once()  # at once, the clock unmoved
    assert (await view(harness, sid))["status"] == "backfilling"
    await upgraded.run_until_idle()
    assert (await view(harness, sid))["status"] == "ready"


async def test_a_segment_built_on_another_taken_up_with_it_waits_for_its_pass(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Both were restarted in the same look: the one built on the other was back-filled against its
    base's stale memberships, then again when the base's pass ended (twice the work, and changes
    announced then taken back)."""
    await seed(harness, 6)  # u00 and u03 are pro
    base = await harness.create_segment(VALID_LATER, "Base")
    built = await harness.create_segment(
        {"or": [{"member_of": base}, {"trait": "d", "op": "before", "value": "9999-12-31"}]}, "Built"
    )
    beyond = await harness.create_segment(
        {"or": [{"member_of": built}, {"trait": "d", "op": "before", "value": "9999-12-31"}]}, "Beyond"
    )
    assert await members(harness, beyond) == ["u00", "u03"]
    await fail_for_definition(harness, base, built, beyond)
    await identify(harness, "p1", "u00", "free")  # real time leaves all three out
    upgraded = upgraded_worker(harness)
    with caplog.at_level(logging.WARNING, logger="services.segmenter.schedules"):
        assert await upgraded.run_once()
    logged = [getattr(r, "segment_id", None) for r in caplog.records if "validates again" in r.getMessage()]
    assert logged == [base]
    assert [(await view(harness, s))["status"] for s in (base, built, beyond)] == [
        "backfilling",
        "failed",
        "failed",
    ]
    await upgraded.run_until_idle()  # the base's end restarts `built`, whose end restarts `beyond`
    for sid in (base, built, beyond):
        v = await view(harness, sid)
        assert v["status"] == "ready" and v["backfill"]["processed"] == 6, v
        assert await members(harness, sid) == ["u03"]
        assert announced(await harness.memberships(), sid) == {
            ("u00", "entered"): 1,
            ("u03", "entered"): 1,
            ("u00", "exited"): 1,
        }


async def test_a_segment_taken_up_again_that_names_a_deleted_one_is_logged(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Taken up again without the check a save makes (member_of names existing segments): silently,
    it counted no member of the missing one."""
    await seed(harness, 3)
    gone = await harness.create_segment({"trait": "plan", "op": "equals", "value": "nobody"}, "Gone")
    sid = await harness.create_segment(
        {"or": [{"member_of": gone}, {"trait": "d", "op": "before", "value": "9999-12-31"}]}
    )
    await fail_for_definition(harness, sid)
    await sql(harness, "DELETE FROM segments WHERE segment_id = :s", s=gone)  # as a newer release might
    upgraded = upgraded_worker(harness)
    with caplog.at_level(logging.WARNING, logger="services.segmenter.schedules"):
        assert await upgraded.run_once()
    logged = [r for r in caplog.records if "no longer exist" in r.getMessage()]
    assert [(getattr(r, "segment_id", None), getattr(r, "missing", None)) for r in logged] == [(sid, [gone])]
    await upgraded.run_until_idle()
    v = await view(harness, sid)
    assert v["status"] == "ready" and v["member_count"] == 0


async def test_a_bare_invalidrule_of_the_release_before_is_recognised(harness: Harness) -> None:
    """The 2026-12-07 release wrote a bare `InvalidRule` when the catalogue gave no reason: such a
    segment was not taken up again, and a retry went on from its cursor."""
    await seed(harness, 6)
    harness.segmenter.settings.backfill_chunk_size = 2
    failed = []
    for name in ("Taken up", "Retried"):
        sid = await create(harness, VALID_LATER, name)
        assert await harness.segmenter.backfill.run_once()  # u00, u01
        await store_definition(harness, sid, "9999-12-31T23:59:59-01:00", new_version=True)
        assert await harness.segmenter.backfill.run_once()
        failed.append(sid)
    taken_up, retried = failed
    await sql(harness, "UPDATE segments SET backfill_error = 'InvalidRule'")
    for sid in (taken_up, retried):
        v = await view(harness, sid)
        assert (v["status"], v["backfill"]["error"], v["backfill"]["processed"]) == (
            "failed",
            "InvalidRule",
            2,
        )
    # Repaired by hand, retried: a new pass.
    await store_definition(harness, retried, "9999-12-31", new_version=True)
    r = await harness.client.post(f"/v1/segments/{retried}/backfill/retry", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "backfilling" and r.json()["backfill"]["processed"] == 0
    # Accepted by a later release: taken up, from the first customer.
    await store_definition(harness, taken_up, "9999-12-31", new_version=False)
    upgraded = Backfill(
        harness.segmenter.platform, harness.clock, SegmentCatalogCache(), harness.segmenter.settings
    )
    assert await upgraded.run_once()
    v = await view(harness, taken_up)
    assert v["status"] == "backfilling" and v["backfill"]["processed"] == 0, v
