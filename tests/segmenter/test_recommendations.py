"""Catalogue and recommendations in the segmenter (issue 9): the catalogue and the counts fed by
events in the batch's unit of work, the bulk upsert API with clear 4xx, per-customer lists (owned
products excluded, cold start), the recommendation segment rule (real time and back-fill agree),
and the lists announced on clm.profiles.v1 for the journey engine and the notifier."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from services.segmenter.domain.catalog import Catalog, compile_segment
from services.segmenter.domain.evaluation import evaluate
from services.segmenter.reevaluation import fill_snapshots
from services.segmenter.store import profiles as profile_store
from services.segmenter.store import segments as segment_store
from shared.contracts.events import CustomerEvent
from shared.contracts.topics import PROFILES
from tests.segmenter.conftest import ADMIN, Harness, make_event
from tests.support import read_topic

CAMERA = {"product_id": "cam", "name": "Camera", "category": "Cameras", "price": 300, "tier": 1}
CAMERA_PRO = {"product_id": "cam-pro", "name": "Camera Pro", "category": "Cameras", "price": 600, "tier": 2}
CARD = {"product_id": "card", "name": "Memory card", "category": "Accessories", "price": 20}
BAG = {"product_id": "bag", "name": "Bag", "category": "Accessories", "price": 45}
BEANS = {"product_id": "beans", "name": "Beans", "category": "Coffee", "price": 12}


def order(mid: str, user: str, *products: dict[str, Any]) -> CustomerEvent:
    return make_event(
        mid, user_id=user, event="Order Completed", properties={"order_id": mid, "products": list(products)}
    )


async def handle(h: Harness, *events: CustomerEvent) -> None:
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(uow, list(events))


async def rows(h: Harness, sql: str) -> list[tuple[Any, ...]]:
    async with h.segmenter.platform.unit_of_work() as uow:
        return [tuple(r) for r in await uow.session.execute(text(sql))]


async def test_catalogue_and_counts_from_events_match_a_full_recompute(harness: Harness) -> None:
    await handle(
        harness,
        make_event("v1", user_id="a", event="Product Viewed", properties={"product_id": "cam", "price": 280}),
        order("o1", "a", CAMERA, CARD, {"product_id": "bad", "price": -1}, "not an object"),
        order("o2", "b", {"id": "cam", "quantity": 2}, CARD, BAG),
        make_event("v2", user_id="b", event="Product Added", properties=BEANS),
        order("o3", "a", CARD),  # already owned: changes no count
    )
    cam = (await harness.client.get("/v1/catalogue/items/cam", headers=ADMIN)).json()
    # The later, partial description (id only) keeps what the earlier ones said; the order's price wins
    # over the view's (later in the batch).
    assert cam == {"product_id": "cam", "name": "Camera", "category": "Cameras", "price": "300", "tier": 1}
    assert (await harness.client.get("/v1/catalogue/items/bad", headers=ADMIN)).status_code == 404
    accessories = (await harness.client.get("/v1/catalogue/items?category=Accessories", headers=ADMIN)).json()
    assert [i["product_id"] for i in accessories["items"]] == ["bag", "card"]

    owned = await rows(
        harness, "SELECT customer_id, kind, product_id FROM customer_products ORDER BY 1, 2, 3"
    )
    assert owned == [
        ("a", "purchase", "cam"),
        ("a", "purchase", "card"),
        ("a", "view", "cam"),
        ("b", "purchase", "bag"),
        ("b", "purchase", "cam"),
        ("b", "purchase", "card"),
        ("b", "view", "beans"),
    ]
    counts_sql = "SELECT signal, product_id, customers FROM product_counts ORDER BY 1, 2"
    pairs_sql = "SELECT signal, a, b, customers FROM product_pairs ORDER BY 1, 2, 3"
    incremental = (await rows(harness, counts_sql), await rows(harness, pairs_sql))
    assert ("purchase", "cam", "card", 2) in incremental[1] and ("purchase", "card", "cam", 2) in incremental[
        1
    ]
    assert ("purchase", "bag", "cam", 1) in incremental[1]

    # A redelivered batch changes nothing (inbox), and the full recompute gives the same counts.
    await handle(harness, order("o2", "b", CAMERA, CARD, BAG))
    r = await harness.client.post("/v1/recommendations/recompute", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["customers"] == 2
    assert (await rows(harness, counts_sql), await rows(harness, pairs_sql)) == incremental


async def test_bulk_upsert_good_and_bad_input(harness: Harness) -> None:
    put = harness.client.put
    good = await put("/v1/catalogue/items", json={"items": [CAMERA, CAMERA_PRO, BEANS]}, headers=ADMIN)
    assert good.status_code == 200 and good.json() == {"upserted": 3}
    coffee = (await harness.client.get("/v1/catalogue/items?category=Coffee", headers=ADMIN)).json()
    assert coffee == {"items": [{**BEANS, "price": "12"}], "next_after": None}
    # An update leaves the fields it does not mention alone.
    await put("/v1/catalogue/items", json={"items": [{"product_id": "beans", "price": 14}]}, headers=ADMIN)
    beans = (await harness.client.get("/v1/catalogue/items/beans", headers=ADMIN)).json()
    assert beans == {**BEANS, "price": "14"}

    bad = await put(
        "/v1/catalogue/items",
        json={"items": [CARD, {"product_id": "x", "price": -5}, {"product_id": "y", "url": "ftp://h/y"}]},
        headers=ADMIN,
    )
    assert bad.status_code == 400
    errors = {(e["field"], e["rule"]) for e in bad.json()["errors"]}
    assert errors == {("items.1.price", "greater_than_equal"), ("items.2.url", "http_url")}
    # Nothing of a refused request is written, not even its valid items.
    assert (await harness.client.get("/v1/catalogue/items/card", headers=ADMIN)).status_code == 404

    dup = await put("/v1/catalogue/items", json={"items": [CARD, BAG, CARD]}, headers=ADMIN)
    assert dup.status_code == 400
    [error] = dup.json()["errors"]
    assert error["field"] == "items" and error["rule"] == "duplicate_product_id"
    assert "items[2]" in error["message"] and "items[0]" in error["message"]

    too_many = [{"product_id": f"p{i}"} for i in range(1001)]
    big = await put("/v1/catalogue/items", json={"items": too_many}, headers=ADMIN)
    assert big.status_code == 400 and big.json()["errors"][0]["rule"] == "too_long"
    unknown = await put(
        "/v1/catalogue/items", json={"items": [{"product_id": "z", "colour": 1}]}, headers=ADMIN
    )
    assert unknown.status_code == 400 and unknown.json()["errors"][0]["field"] == "items.0.colour"
    assert (await put("/v1/catalogue/items", json={"items": [CARD]})).status_code == 401


async def seed_shop(h: Harness) -> None:
    r = await h.client.put(
        "/v1/catalogue/items", json={"items": [CAMERA, CAMERA_PRO, CARD, BAG, BEANS]}, headers=ADMIN
    )
    assert r.status_code == 200
    await handle(
        h,
        order("o1", "c1", CAMERA, CARD),
        order("o2", "c2", CAMERA, CARD, BAG),
        order("o3", "c3", CAMERA, CARD),
        order("o4", "c4", BEANS),
        order("o5", "c5", BEANS, BAG),
        make_event("i6", "identify", user_id="newbie", traits={"email": "n@example.com"}),
    )


async def test_recommendations_exclude_owned_products_and_cold_start(harness: Harness) -> None:
    await seed_shop(harness)
    await handle(harness, order("o6", "buyer", CAMERA))
    r = await harness.client.get("/v1/customers/buyer/recommendations?limit=3", headers=ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    cross = body["cross_sell"]
    assert cross[0]["product_id"] == "card" and cross[0]["source"] == "co_purchase"
    assert cross[0]["reason"] == "bought with Camera by 3 customers"
    assert "cam" not in [c["product_id"] for c in cross] and len(cross) == 3
    assert [u["product_id"] for u in body["upsell"]] == ["cam-pro"]
    assert body["upsell"][0]["reason"] == "upgrade from Camera: higher tier (2 vs 1) in Cameras"

    # No history: best sellers overall (by distinct buyers, then id).
    cold = (await harness.client.get("/v1/customers/newbie/recommendations?limit=3", headers=ADMIN)).json()
    assert [c["product_id"] for c in cold["cross_sell"]] == ["cam", "card", "bag"]
    assert {c["source"] for c in cold["cross_sell"]} == {"best_seller"} and cold["upsell"] == []

    # The profile carries the stored lists, as templates see them.
    profile = await harness.customer("buyer")
    assert profile["recommendations"]["cross_sell"][0]["name"] == "Memory card"
    assert profile["recommendations"]["cross_sell"][0]["price"] == "20"
    assert (
        await harness.client.get("/v1/customers/nobody/recommendations", headers=ADMIN)
    ).status_code == 404
    bad_limit = await harness.client.get("/v1/customers/buyer/recommendations?limit=0", headers=ADMIN)
    assert bad_limit.status_code == 400 and bad_limit.json()["errors"][0]["field"] == "limit"


async def test_lists_are_announced_on_profiles_topic_when_they_change(harness: Harness) -> None:
    await seed_shop(harness)
    await handle(harness, order("o6", "buyer", CAMERA))
    await handle(harness, order("o7", "buyer", CAMERA))  # owned already: lists unchanged, no announcement
    await harness.relay()
    msgs = await read_topic(harness.settings.topic(PROFILES.name), idle=0.5, timeout=8)
    mine = [
        m["value"] for m in msgs if m["value"]["customer_id"] == "buyer" and m["value"].get("recommendations")
    ]
    assert len(mine) == 1
    assert mine[0]["event_id"] == "profile:buyer:o6:recommendations"
    names = [p["name"] for p in mine[0]["recommendations"]["cross_sell"][:3]]
    assert names[0] == "Memory card" and "Camera" not in names


async def test_recommendation_rule_real_time_and_backfill_agree(harness: Harness) -> None:
    bad = await harness.client.post(
        "/v1/segments", json={"name": "x", "definition": {"recommendation": "downsell"}}, headers=ADMIN
    )
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "definition.recommendation"

    await seed_shop(harness)
    definition = {"recommendation": "cross_sell", "category": "Accessories"}
    sid = await harness.create_segment(definition, "Accessory cross-sell")
    # Real time: a camera buyer gets the memory card as cross-sell candidate and enters at once.
    await handle(harness, order("o6", "buyer", CAMERA))
    entered = [m for m in await harness.memberships() if m["customer_id"] == "buyer"]
    assert [(m["change"], m["cause"]) for m in entered] == [("entered", "o6")]
    # ... and leaves when they own every accessory (their lists change with their purchases).
    await handle(harness, order("o7", "buyer", CARD, BAG))
    members = (await harness.client.get(f"/v1/segments/{sid}/members", headers=ADMIN)).json()["members"]
    assert "buyer" not in members and "c1" in members  # c1 owns the card, but not the bag

    now = harness.clock.now()
    rules = [
        definition,
        {"recommendation": "cross_sell", "category": "Coffee"},
        {"recommendation": "upsell", "category": "Cameras"},
        {"recommendation": "upsell"},
        {"not": {"recommendation": "cross_sell"}},
    ]
    async with harness.segmenter.platform.unit_of_work() as uow:
        ids = await profile_store.existing_customer_ids(
            uow.session, ["c1", "c2", "c3", "c4", "c5", "newbie", "buyer"]
        )
        for i, raw in enumerate(rules):
            seg = compile_segment(f"r{i}", "r", 1, raw)
            profiles = await profile_store.lock_profiles(uow.session, ids)
            await fill_snapshots(uow.session, Catalog.build([seg]), profiles, now)
            expected = {cid for cid, p in profiles.items() if evaluate(seg.rule, p, now)}
            assert expected == await segment_store.matching_ids(uow.session, seg.rule, now), raw
            assert 0 < len(expected) < len(ids), raw
