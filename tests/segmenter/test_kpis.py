"""The KPI API on a small hand-built data set (values computed by hand in the comments), and bad queries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tests.segmenter.conftest import ADMIN, Harness, make_event


def at(day: str, hour: int = 12) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)


def order(mid: str, user: str, day: str, total: float, hour: int = 12) -> Any:
    return make_event(
        mid,
        "track",
        user_id=user,
        event="Order Completed",
        properties={"total": total},
        timestamp=at(day, hour),
    )


def survey(mid: str, user: str, day: str, kind: str, score: int) -> Any:
    props = {"survey_type": kind, "score": score}
    return make_event(
        mid, "track", user_id=user, event="Survey Responded", properties=props, timestamp=at(day)
    )


async def get(harness: Harness, path: str) -> dict[str, Any]:
    r = await harness.client.get(path, headers=ADMIN)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_kpis_on_a_hand_built_data_set(harness: Harness) -> None:
    vip = await harness.create_segment({"trait": "vip", "op": "equals", "value": True}, name="VIP")
    harness.clock.set(at("2026-04-01"))
    events = [
        make_event("i-a", "identify", user_id="a", traits={"vip": True}, timestamp=at("2026-01-05")),
        order("o-a1", "a", "2026-01-10", 10),
        order("o-a2", "a", "2026-02-10", 20),
        order("o-a3", "a", "2026-03-10", 30),
        order("o-b1", "b", "2026-01-15", 40),
        order("o-c1", "c", "2026-02-20", 50),
        survey("n-a1", "a", "2026-01-20", "nps", 10),
        survey("n-b1", "b", "2026-01-25", "nps", 5),
        survey("n-c1", "c", "2026-02-22", "nps", 8),
        survey("n-a2", "a", "2026-02-25", "nps", 9),
        survey("s-a1", "a", "2026-01-21", "csat", 5),
        survey("s-b1", "b", "2026-01-26", "csat", 2),
        survey("s-c1", "c", "2026-03-05", "csat", 4),
    ]
    await harness.send(*events)
    await harness.processed(len(events))
    q = "from=2026-01-01&to=2026-03-31&period=month"

    # Active window 30 days. Jan 31: a (Jan 10), b (Jan 15). Feb 28: a (Feb 10), c (Feb 20).
    # Mar 31: a (Mar 10).
    body = await get(harness, f"/v1/kpis/retention?{q}&active_window_days=30")
    got = [
        (
            p["start"],
            p["end"],
            p["customers_at_start"],
            p["customers_at_end"],
            p["new_customers"],
            p["retained"],
            p["retention_rate"],
            p["churn_rate"],
        )
        for p in body["periods"]
    ]
    assert got == [
        ("2026-01-01", "2026-01-31", 0, 2, 2, 0, None, None),
        ("2026-02-01", "2026-02-28", 2, 2, 1, 1, 0.5, 0.5),  # (E - N) / S = (2 - 1) / 2; b churned
        ("2026-03-01", "2026-03-31", 2, 1, 0, 1, 0.5, 0.5),  # c churned
    ]
    # A first order on a period's first day is that period's (it was the period before's, or nobody's).
    one_day = await get(harness, "/v1/kpis/retention?from=2026-02-20&to=2026-02-20&active_window_days=30")
    assert [(p["start"], p["end"], p["new_customers"]) for p in one_day["periods"]] == [
        ("2026-02-20", "2026-02-20", 1)
    ]

    body = await get(harness, f"/v1/kpis/cohorts?{q}")
    assert body["months_since"] == [0, 1, 2]
    assert body["cohorts"] == [
        {"cohort": "2026-01", "size": 2, "active": [2, 1, 1], "retention": [1.0, 0.5, 0.5]},
        {"cohort": "2026-02", "size": 1, "active": [1, 0, None], "retention": [1.0, 0.0, None]},
    ]
    # From February on: as wide as February's cohort needs (no column for January's third month).
    body = await get(harness, "/v1/kpis/cohorts?from=2026-02-01&to=2026-03-31&period=month")
    assert body["months_since"] == [0, 1]
    assert body["cohorts"] == [{"cohort": "2026-02", "size": 1, "active": [1, 0], "retention": [1.0, 0.0]}]

    # Jan: 10 (promoter), 5 (detractor) -> 0. Feb: 8 (passive), 9 (promoter) -> 50. Overall 2P 1D of 4 -> 25.
    body = await get(harness, f"/v1/kpis/nps?{q}")
    assert [(p["period"], p["responses"], p["nps"]) for p in body["series"]] == [
        ("2026-01", 2, 0.0),
        ("2026-02", 2, 50.0),
        ("2026-03", 0, None),
    ]
    assert body["overall"]["nps"] == 25.0
    body = await get(harness, f"/v1/kpis/nps?{q}&segment_id={vip}")
    assert [p["nps"] for p in body["series"]] == [100.0, 100.0, None]

    # Jan: 5, 2 -> 50 %. Feb: none. Mar: 4 -> 100 %. Overall 2 of 3.
    body = await get(harness, f"/v1/kpis/csat?{q}")
    assert [(p["period"], p["responses"], p["csat"]) for p in body["series"]] == [
        ("2026-01", 2, 50.0),
        ("2026-02", 0, None),
        ("2026-03", 1, 100.0),
    ]
    assert body["overall"]["csat"] == 200 / 3

    # Stages on Apr 1: a advocacy (promoter, ordered), b and c retention (one order, 76 / 40 days ago).
    body = await get(harness, "/v1/kpis/clv")
    assert body["overall"] == {"customers": 3, "historical": 50.0, "predicted": None}
    assert body["by_stage"]["historical"] == {
        "advocacy": {"count": 1, "mean": 60.0},
        "retention": {"count": 2, "mean": 45.0},
    }
    assert body["by_stage"]["predicted"] == {
        "advocacy": {"count": 0, "mean": None},
        "retention": {"count": 0, "mean": None},
    }
    assert body["by_segment"]["historical"] == {vip: {"count": 1, "mean": 60.0}}

    body = await get(harness, "/v1/kpis/stages?from=2026-03-01&to=2026-04-30")
    assert [(p["period"], p["counts"]) for p in body["distribution"]] == [
        ("2026-03", {}),
        ("2026-04", {"advocacy": 1, "retention": 2}),
    ]
    assert body["transitions"] == {"none": {"advocacy": 1, "retention": 2}}
    assert sum(n for targets in body["changes"].values() for n in targets.values()) >= 3

    # b orders again on Apr 10 while in retention.
    harness.clock.set(at("2026-04-10"))
    await harness.send(order("o-b2", "b", "2026-04-10", 100, hour=11))
    await harness.processed(len(events) + 1)
    body = await get(harness, "/v1/kpis/revenue-by-stage?from=2026-01-01&to=2026-04-30")
    assert body["stages"] == [
        {"stage": "none", "orders": 5, "revenue": 150.0},
        {"stage": "retention", "orders": 1, "revenue": 100.0},
    ]
    assert body["total"] == 250.0


async def test_bad_kpi_queries_are_refused_with_the_field_and_rule(harness: Harness) -> None:
    cases = {
        "/v1/kpis/retention?period=year": ("period", "literal_error"),
        "/v1/kpis/nps?from=2026-13-01": ("from", "date_from_datetime_parsing"),
        "/v1/kpis/csat?from=2026-03-01&to=2026-02-01": ("to", "after_from"),
        "/v1/kpis/clv?segment_id=seg_nope": ("segment_id", "exists"),
        "/v1/kpis/retention?active_window_days=0": ("active_window_days", "greater_than_equal"),
        "/v1/kpis/stages?from=1900-01-01&to=2026-01-01&period=week": ("from", "max_periods"),
        "/v1/kpis/cohorts?to=0001-01-01": ("to", "range"),
        "/v1/kpis/nps?from=1899-12-31&to=2026-01-01": ("from", "range"),
    }
    for path, (field, rule) in cases.items():
        r = await harness.client.get(path, headers=ADMIN)
        assert r.status_code == 400, (path, r.text)
        errors = r.json()["errors"]
        assert errors[0]["field"] == field, (path, errors)
        assert errors[0]["rule"].startswith(rule.split("_from")[0]), (path, errors)
    assert (await harness.client.get("/v1/kpis/retention")).status_code == 401
