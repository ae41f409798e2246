"""Lifecycle in the segmenter through the real broker and database: stages moved by events and announced
once each, surveys, refit, stage policy, lifecycle fields in segment rules, engagement from message
statuses."""

from __future__ import annotations

import asyncio
import contextlib
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from services.segmenter.domain.catalog import Catalog, compile_segment
from services.segmenter.domain.evaluation import evaluate
from services.segmenter.domain.lifecycle import bgnbd
from services.segmenter.domain.lifecycle import gamma_gamma as gg
from services.segmenter.domain.lifecycle.snapshot import FittedModels, Order, customer_metrics
from services.segmenter.domain.profile import order_revenue
from services.segmenter.reevaluation import fill_snapshots
from services.segmenter.store import lifecycle as lifecycle_store
from services.segmenter.store import profiles as profile_store
from services.segmenter.store import segments as segment_store
from shared.contracts.events import MessageStatus
from shared.contracts.topics import MESSAGE_STATUS, PROFILES
from shared.db.engine import create_engine
from shared.db.locks import try_exclusive
from tests.segmenter.conftest import ADMIN, Harness, make_event
from tests.support import eventually, read_topic


async def stage_changes(harness: Harness, idle: float = 0.5) -> list[dict[str, Any]]:
    await harness.relay()
    msgs = await read_topic(harness.settings.topic(PROFILES.name), idle=idle, timeout=8)
    return [m["value"] for m in msgs if m["value"]["kind"] == "stage_changed"]


def order(mid: str, user: str, at: datetime, total: float) -> Any:
    return make_event(
        mid, "track", user_id=user, event="Order Completed", properties={"total": total}, timestamp=at
    )


async def test_sign_up_then_orders_move_a_customer_through_stages_each_change_announced_once(
    harness: Harness,
) -> None:
    clock = harness.clock
    await harness.send(make_event("s1", "track", user_id="u1", event="Signed Up", timestamp=clock.now()))
    await harness.processed(1)
    clock.advance(timedelta(days=40))  # no order 40 days after signing up: a lead
    await harness.send(make_event("p1", "page", user_id="u1", timestamp=clock.now()))
    await harness.processed(2)
    await harness.send(order("o1", "u1", clock.now(), 20))
    await harness.processed(3)
    await harness.send(order("o1", "u1", clock.now(), 20))  # a redelivery changes nothing
    await harness.processed(4)
    clock.advance(timedelta(days=40))  # a second order within the growth window: repeat purchases rising
    await harness.send(order("o2", "u1", clock.now(), 30))
    await harness.processed(5)
    clock.advance(timedelta(days=130))  # no order for 130 days (> 120)
    await harness.send(make_event("p2", "page", user_id="u1", timestamp=clock.now()))
    await harness.processed(6)

    changes = await stage_changes(harness)
    assert [(c["previous_stage"], c["lifecycle_stage"], c["caused_by"]) for c in changes] == [
        (None, "onboarding", "s1"),
        ("onboarding", "acquisition", "p1"),
        ("acquisition", "onboarding", "o1"),
        ("onboarding", "growth", "o2"),
        ("growth", "at_risk", "p2"),
    ]
    assert len({c["event_id"] for c in changes}) == 5
    assert all(c["customer_id"] == "u1" for c in changes)

    profile = await harness.customer("u1")
    lc = profile["lifecycle"]
    assert lc["stage"] == "at_risk"
    assert datetime.fromisoformat(lc["since"]) == clock.now()
    assert [(h["from"], h["to"]) for h in lc["history"]] == [
        (c["previous_stage"], c["lifecycle_stage"]) for c in changes
    ]
    assert lc["clv"]["historical"] == 50.0
    # One buyer in the base and no model yet: RFM scores against no cut points are the middle.
    assert lc["rfm"] == {"r": 3, "f": 3, "m": 3, "score": 333}


async def test_survey_answers_set_nps_and_csat_and_invalid_ones_are_ignored(harness: Harness) -> None:
    now = harness.clock.now()
    await harness.send(
        order("o1", "u1", now, 10),
        make_event(
            "n1",
            "track",
            user_id="u1",
            event="Survey Responded",
            properties={"survey_type": "nps", "score": "9", "comment": " great "},
            timestamp=now,
        ),
        make_event(
            "n0",
            "track",
            user_id="u1",
            event="Survey Responded",  # older: does not win
            properties={"survey_type": "nps", "score": 3},
            timestamp=now - timedelta(days=2),
        ),
        make_event(
            "bad",
            "track",
            user_id="u1",
            event="Survey Responded",
            properties={"survey_type": "nps", "score": 11},
            timestamp=now,
        ),
        make_event(
            "c1",
            "track",
            user_id="u1",
            event="Survey Responded",
            properties={"survey_type": "CSAT", "score": 4.0},
            timestamp=now,
        ),
    )
    await harness.processed(5)
    lc = (await harness.customer("u1"))["lifecycle"]
    assert lc["nps"]["score"] == 9 and lc["nps"]["category"] == "promoter"
    assert lc["csat"]["score"] == 4
    assert lc["stage"] == "advocacy"  # a buyer who promotes the brand
    async with harness.segmenter.platform.engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT message_id, survey_type, score, comment FROM survey_responses ORDER BY message_id"
                )
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("c1", "csat", 4, None),
        ("n0", "nps", 3, None),
        ("n1", "nps", 9, "great"),
    ]


async def test_a_survey_answer_with_a_numeric_id_or_a_long_comment_still_counts(harness: Harness) -> None:
    """Survey tools number their surveys and customers write long comments: the score is what
    counts; the id is kept as text, the comment cut at 2,000 characters, and the metric says so."""
    now = harness.clock.now()

    def adjusted(outcome: str) -> float:
        value = REGISTRY.get_sample_value(
            "clm_segmenter_survey_answers_adjusted_total",
            {"field": "properties.comment", "rule": "max_length", "outcome": outcome},
        )
        return value or 0.0

    before = adjusted("truncated")
    await harness.send(
        make_event(
            "s1",
            "track",
            user_id="u1",
            event="Survey Responded",
            properties={"survey_type": "nps", "score": 10, "survey_id": 42},
            timestamp=now - timedelta(hours=1),
        ),
        make_event(
            "s2",
            "track",
            user_id="u1",
            event="Survey Responded",
            properties={"survey_type": "csat", "score": 2, "comment": "z" * 3000, "survey_id": 7},
            timestamp=now,
        ),
    )
    await harness.processed(2)
    lc = (await harness.customer("u1"))["lifecycle"]
    assert lc["nps"]["score"] == 10 and lc["csat"]["score"] == 2
    async with harness.segmenter.platform.engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT message_id, survey_id, length(comment) FROM survey_responses ORDER BY 1")
            )
        ).all()
    assert [tuple(r) for r in rows] == [("s1", "42", None), ("s2", "7", 2000)]
    assert adjusted("truncated") == before + 1


async def seed_base(harness: Harness, customers: int = 60) -> int:
    """Customers whose purchases are drawn from the BG/NBD process with the CDNOW parameters (seeded)."""
    rng = np.random.default_rng(7)
    now = harness.clock.now()
    ages = rng.uniform(4, 52, size=customers)  # weeks since the first order
    x, t_x = bgnbd.simulate(bgnbd.BgNbdParams(r=0.243, alpha=4.414, a=0.793, b=2.426), ages, rng)
    events = []
    for i in range(customers):
        first = now - timedelta(weeks=float(ages[i]))
        offsets = [*sorted(rng.uniform(0, t_x[i], size=int(x[i]) - 1)), t_x[i]] if x[i] > 0 else []
        for k, week in enumerate([0.0, *offsets]):
            amount = float(round(rng.gamma(6.0, 5.0), 2))
            events.append(order(f"o{i}-{k}", f"c{i:02d}", first + timedelta(weeks=float(week)), amount))
    await harness.send(*events)
    await harness.processed(len(events))
    return len(events)


def same(stored: float | None, expected: Any) -> bool:
    if expected is None or math.isnan(expected):
        return stored is None
    return stored == pytest.approx(expected, rel=1e-7)


async def test_refit_stores_the_model_and_recomputes_every_customer(harness: Harness) -> None:
    harness.clock.set(datetime(2026, 12, 1, 12, 0, tzinfo=UTC))
    seeded = await seed_base(harness)
    assert (await harness.client.get("/v1/lifecycle/model", headers=ADMIN)).status_code == 404
    assert (await harness.client.post("/v1/lifecycle/refit")).status_code == 401

    r = await harness.client.post("/v1/lifecycle/refit", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["customers"] == 60
    model = (await harness.client.get("/v1/lifecycle/model", headers=ADMIN)).json()
    assert model["model_id"] == r.json()["model_id"]
    params = model["transactions"]["params"]
    assert set(params) == {"r", "alpha", "a", "b"} and all(v > 0 for v in params.values())
    assert model["transactions"]["n_customers"] == 60 and "converged" in model["transactions"]
    assert model["spend"] is not None and set(model["spend"]["params"]) == {"p", "q", "v"}
    assert datetime.fromisoformat(model["fitted_at"]) == harness.clock.now()

    # Stored metrics are the per-customer definitions with the stored parameters.
    models = FittedModels(bgnbd.BgNbdParams(**params), gg.GammaGammaParams(**model["spend"]["params"]))
    async with harness.segmenter.platform.engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT customer_id, timestamp, (properties->>'total')::float8 AS total FROM events "
                    "WHERE customer_id IN ('c05', 'c17') ORDER BY timestamp"
                )
            )
        ).all()
    for cid in ("c05", "c17"):
        orders = [Order(r.timestamp, r.total) for r in rows if r.customer_id == cid]
        expected = customer_metrics(as_of=harness.clock.now(), orders=orders, models=models)
        lc = (await harness.customer(cid))["lifecycle"]
        assert lc["p_alive"] is not None and same(lc["p_alive"], expected["p_alive"])
        assert same(lc["churn_risk"], expected["churn_risk"])
        assert lc["expected_orders_90d"] is not None
        assert same(lc["expected_orders_90d"], expected["expected_orders"])
        assert same(lc["clv"]["predicted_12m"], expected["predicted_clv"])
        assert 1 <= lc["rfm"]["r"] <= 5 and 1 <= lc["rfm"]["m"] <= 5

    # The next event recomputes the customer from the stored model.
    harness.clock.advance(timedelta(days=1))
    await harness.send(make_event("pv", "page", user_id="c05", timestamp=harness.clock.now()))
    await harness.processed(seeded + 1)
    async with harness.segmenter.platform.engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT timestamp, (properties->>'total')::float8 AS total FROM events "
                    "WHERE customer_id = 'c05' AND event = 'Order Completed'"
                )
            )
        ).all()
    expected = customer_metrics(
        as_of=harness.clock.now(), orders=[Order(r[0], r[1]) for r in rows], models=models
    )
    lc = (await harness.customer("c05"))["lifecycle"]
    assert same(lc["p_alive"], expected["p_alive"])


async def test_a_stage_policy_change_is_validated_and_recomputes_stages(harness: Harness) -> None:
    now = harness.clock.now()
    await harness.send(order("o1", "u1", now - timedelta(days=50), 10))
    await harness.processed(1)
    assert (await harness.customer("u1"))["lifecycle"]["stage"] == "retention"
    r = await harness.client.put(
        "/v1/lifecycle/stages", json={"thresholds": {"onboarding_days": -1}}, headers=ADMIN
    )
    assert r.status_code == 400
    assert r.json()["errors"][0]["field"] == "thresholds.onboarding_days"
    assert r.json()["errors"][0]["rule"] == "greater_than_equal"
    bad_rule = {"rules": [{"stage": "growth", "when": {"field": "nps_category", "op": "gt", "value": "x"}}]}
    r = await harness.client.put("/v1/lifecycle/stages", json=bad_rule, headers=ADMIN)
    assert r.status_code == 400 and r.json()["errors"][0]["field"].startswith("rules.0.when")
    assert (await harness.client.get("/v1/lifecycle/stages", headers=ADMIN)).json()["is_default"] is True

    r = await harness.client.put(
        "/v1/lifecycle/stages", json={"thresholds": {"onboarding_days": 60}}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    assert r.json()["recomputed"] == {"customers": 1, "stage_changes": 1}
    assert (await harness.customer("u1"))["lifecycle"]["stage"] == "onboarding"
    got = await harness.client.get("/v1/lifecycle/stages", headers=ADMIN)
    assert got.json()["is_default"] is False and got.json()["policy"] == r.json()["policy"]
    changes = await stage_changes(harness)
    assert [(c["previous_stage"], c["lifecycle_stage"], c["caused_by"]) for c in changes] == [
        (None, "retention", "o1"),
        ("retention", "onboarding", changes[1]["caused_by"]),
    ]
    assert changes[1]["caused_by"].startswith("policy:")


async def test_segments_on_lifecycle_fields_in_real_time_and_back_fill_agree(harness: Harness) -> None:
    onboarding = await harness.create_segment(
        {"profile": "lifecycle_stage", "op": "equals", "value": "onboarding"}, name="Onboarding"
    )
    now = harness.clock.now()
    await harness.send(order("o1", "u1", now, 10), order("o2", "u2", now - timedelta(days=200), 10))
    await harness.processed(2)
    msgs = await harness.memberships()
    assert [(m["customer_id"], m["segment_id"], m["change"]) for m in msgs] == [("u1", onboarding, "entered")]

    # A customer leaving the stage leaves the segment in real time.
    harness.clock.advance(timedelta(days=31))
    await harness.send(make_event("p1", "page", user_id="u1", timestamp=harness.clock.now()))
    await harness.processed(3)
    msgs = await harness.memberships()
    assert [(m["customer_id"], m["change"], m["cause"]) for m in msgs][-1] == ("u1", "exited", "p1")

    # Back-fill (SQL) selects the same customers as the real-time (Python) path.
    risky = {
        "and": [
            {"profile": "lifecycle_stage", "op": "in", "values": ["at_risk", "churned"]},
            {"profile": "rfm_score", "op": "gte", "value": 111},
        ]
    }
    sid = await harness.create_segment(risky, name="Risky")
    r = await harness.client.get(f"/v1/segments/{sid}/members", headers=ADMIN)
    assert r.json()["members"] == ["u2"]
    r = await harness.client.post(
        "/v1/segments/preview", json={"definition": {"profile": "churn_risk", "op": "exists"}}, headers=ADMIN
    )
    assert r.json()["count"] == 0  # no model fitted yet: churn risk unknown
    bad = {"profile": "lifecycle_stage", "op": "gt", "value": 1}
    r = await harness.client.post("/v1/segments", json={"name": "x", "definition": bad}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["errors"][0]["rule"] == "text_field"


async def test_engagement_from_message_statuses_shows_on_the_profile(harness: Harness) -> None:
    await harness.send(make_event("i1", "identify", user_id="u1", traits={"email": "a@example.com"}))
    await harness.processed(1)
    t = harness.clock.now()

    def status(sid: str, mid: str, st: str, minutes: int) -> MessageStatus:
        return MessageStatus.model_validate(
            {
                "status_id": sid,
                "message_id": mid,
                "customer_id": "u1",
                "status": st,
                "channel": "email",
                "occurred_at": t + timedelta(minutes=minutes),
                "template_id": "welcome" if mid == "m1" else "promo",
            }
        )

    statuses = [
        status("s1", "m1", "sent", 0),
        status("s2", "m1", "delivered", 1),
        status("s3", "m1", "opened", 2),
        status("s4", "m1", "clicked", 3),
        status("s4", "m1", "clicked", 3),
        status("s5", "m2", "sent", 5),
        status("s6", "m3", "bounced", 6),
    ]
    for s in statuses:
        await harness.segmenter.platform.producer.publish(MESSAGE_STATUS.name, s.customer_id, s)

    async def shown() -> bool:  # every status handled (they may arrive in several batches)
        e = (await harness.customer("u1"))["engagement"]
        return len(e["recent_messages"]) == 3 and e["messages_clicked"] == 1

    await eventually(shown, timeout=15)
    e = (await harness.customer("u1"))["engagement"]
    assert (e["messages_received"], e["messages_opened"], e["messages_clicked"]) == (2, 1, 1)
    assert [(m["message_id"], m["status"], m["template_id"]) for m in e["recent_messages"]] == [
        ("m3", "bounced", "promo"),
        ("m2", "sent", "promo"),
        ("m1", "clicked", "welcome"),
    ]


LIFECYCLE_RULES: list[Any] = [
    {"profile": "churn_risk", "op": "gt", "value": 0.3},
    {"profile": "p_alive", "op": "lte", "value": 0.9},
    {"profile": "lifecycle_stage", "op": "in", "values": ["at_risk", "churned"]},
    {"profile": "lifecycle_stage", "op": "not_equals", "value": "retention"},
    {"profile": "rfm_score", "op": "gte", "value": 333},
    {"profile": "predicted_clv", "op": "gt", "value": 20},
    {"profile": "expected_orders", "op": "lt", "value": 0.5},
    {"profile": "lifecycle_stage_since", "op": "within", "duration": "1d"},
]


async def test_lifecycle_rules_agree_between_sql_and_python_after_a_refit(harness: Harness) -> None:
    harness.clock.set(datetime(2026, 12, 1, 12, 0, tzinfo=UTC))
    # Small chunks: the refit reads and writes the base in several keyset chunks.
    lifecycle = harness.segmenter.lifecycle
    lifecycle.settings = lifecycle.settings.model_copy(update={"lifecycle_chunk_size": 7})
    segment = await harness.create_segment({"profile": "churn_risk", "op": "gt", "value": 0.3}, name="Risky")
    await seed_base(harness)
    assert (await harness.client.get(f"/v1/segments/{segment}/members", headers=ADMIN)).json()[
        "members"
    ] == []
    assert (await harness.client.post("/v1/lifecycle/refit", headers=ADMIN)).status_code == 200
    now = harness.clock.now()
    ids = {f"c{i:02d}" for i in range(60)}
    async with harness.segmenter.platform.unit_of_work() as uow:
        for i, definition in enumerate(LIFECYCLE_RULES):
            seg = compile_segment(f"r{i}", "r", 1, definition)
            profiles = await profile_store.lock_profiles(uow.session, ids)
            await fill_snapshots(uow.session, Catalog.build([seg]), profiles, now)
            expected = {cid for cid, p in profiles.items() if evaluate(seg.rule, p, now)}
            got = await segment_store.matching_ids(uow.session, seg.rule, now)
            assert got == expected, (definition, sorted(got ^ expected))
            if "duration" not in definition:  # every stage was set at the same moment
                assert 0 < len(expected) < 60, definition  # each rule splits the base
            if i == 0:
                risky = expected
    # The refit re-back-fills segments on lifecycle fields: members are the risky customers now.
    await harness.segmenter.backfill.run_until_idle()
    r = await harness.client.get(f"/v1/segments/{segment}/members?limit=100", headers=ADMIN)
    assert set(r.json()["members"]) == risky


async def test_a_refit_on_a_base_too_small_to_fit_stores_a_model_without_parameters(harness: Harness) -> None:
    r = await harness.client.post("/v1/lifecycle/refit", headers=ADMIN)
    assert r.status_code == 200 and r.json()["customers"] == 0
    await harness.send(order("o1", "u1", harness.clock.now(), 10))
    await harness.processed(1)
    assert (await harness.client.post("/v1/lifecycle/refit", headers=ADMIN)).json()["customers"] == 1
    model = (await harness.client.get("/v1/lifecycle/model", headers=ADMIN)).json()
    assert model["transactions"] is None and model["spend"] is None and model["buyers"] == 1
    lc = (await harness.customer("u1"))["lifecycle"]
    assert lc["stage"] == "onboarding" and lc["p_alive"] is None and lc["rfm"]["score"] == 333


async def test_the_refit_loop_leaves_the_refit_to_the_replica_holding_the_lock(harness: Harness) -> None:
    # Every replica runs the loop; while another holds the refit lock this one fits nothing.
    engine = harness.segmenter.platform.engine
    lock = f"{harness.settings.db_schema}:lifecycle-refit"
    other_replica = create_engine(harness.settings.database_url, harness.settings.db_schema)
    try:
        async with try_exclusive(other_replica, lock) as held:
            assert held
            loop = asyncio.create_task(harness.segmenter.lifecycle.run_forever())
            await asyncio.sleep(0.5)
            assert (await harness.client.get("/v1/lifecycle/model", headers=ADMIN)).status_code == 404
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        loop = asyncio.create_task(harness.segmenter.lifecycle.run_forever())
        try:
            # Lock free and no model yet: the first round refits.
            await eventually(lambda: _model_fitted(harness), timeout=15)
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        async with try_exclusive(engine, lock) as free_again:
            assert free_again
    finally:
        await other_replica.dispose()


async def _model_fitted(harness: Harness) -> bool:
    r = await harness.client.get("/v1/lifecycle/model", headers=ADMIN)
    return r.status_code == 200


ORDER_AMOUNTS: list[dict[str, Any]] = [
    {"revenue": 20},
    {"revenue": "19.90"},
    {"revenue": " 7 "},
    {"total": 35.5},
    {"revenue": "n/a", "total": 12},
    {"revenue": 1e308, "total": 9},  # a placeholder past the bound: `total` counts instead
    {"revenue": "1e400"},  # past float8: refused, not a cast error
    {"revenue": "1e99999"},
    {"revenue": -(2**63)},
    {"revenue": "\u20035"},  # a Unicode space, which PostgreSQL's numeric refuses
    {"revenue": "1_000"},
    {"revenue": True},
    {"revenue": None, "total": [3]},
    {},
]


async def test_order_amounts_agree_in_python_and_sql_and_absurd_ones_count_nothing(harness: Harness) -> None:
    """`order_revenue` (the profile's revenue, in real time) and `ORDER_AMOUNT_SQL` (aggregates, KPIs)
    read every amount the same way; amounts past 1e12 count nothing, so no sum overflows."""
    events = [
        make_event(f"amount-{i}", user_id=f"payer{i}", event="Order Completed", properties=props)
        for i, props in enumerate(ORDER_AMOUNTS)
    ] + [
        make_event(f"again-{i}", user_id="big", event="Order Completed", properties={"revenue": 9e307})
        for i in range(3)
    ]
    async with harness.segmenter.platform.unit_of_work() as uow:
        await harness.segmenter.events.handle(uow, events)  # once failed: "value out of range: overflow"
        amount = lifecycle_store.ORDER_AMOUNT_SQL
        rows = await uow.session.execute(
            text(f"SELECT message_id, {amount} FROM events WHERE message_id LIKE 'amount-%'")
        )
        in_sql = {r[0]: float(r[1]) for r in rows}
    in_python = {f"amount-{i}": order_revenue(props) for i, props in enumerate(ORDER_AMOUNTS)}
    assert in_sql == in_python
    assert [in_python[f"amount-{i}"] for i in range(4)] == [20.0, 19.9, 7.0, 35.5]
    assert in_python["amount-5"] == 9.0 and in_python["amount-6"] == 0.0
    r = await harness.client.get("/v1/customers/big", headers=ADMIN)
    assert r.status_code == 200 and r.json()["commerce"] == {
        **r.json()["commerce"],
        "orders_count": 3,
        "revenue": 0.0,
    }
