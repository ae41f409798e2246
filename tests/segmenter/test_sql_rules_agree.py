"""The SQL compilation of rules (back-fill, preview), the Python interpreter (the reference) and the
compiled rules (real time) agree: same members and same next due moment, on the same stored
profiles, for every operator."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from sqlalchemy import text

from services.segmenter.domain.catalog import Catalog, compile_segment
from services.segmenter.domain.evaluation import evaluate, next_change_at
from services.segmenter.reevaluation import fill_snapshots
from services.segmenter.store import profiles as profile_store
from services.segmenter.store import segments as segment_store
from tests.segmenter.conftest import START, Harness, make_event

RULES: list[Any] = [
    {"trait": "plan", "op": "equals", "value": "pro"},
    {"trait": "age", "op": "equals", "value": 30},
    {"trait": "vip", "op": "equals", "value": True},
    {"trait": "plan", "op": "not_equals", "value": "pro"},
    {"trait": "plan", "op": "in", "values": ["free", "team"]},
    {"trait": "email", "op": "contains", "value": "@corp"},
    {"trait": "tags", "op": "contains", "value": "beta"},
    {"trait": "age", "op": "exists"},
    {"trait": "age", "op": "not_exists"},
    {"trait": "age", "op": "gt", "value": 30},
    {"trait": "age", "op": "gte", "value": 30},
    {"trait": "score", "op": "lt", "value": 0.5},
    {"trait": "score", "op": "lte", "value": 0.5},
    {"trait": "signed_up_at", "op": "within", "duration": "10d"},
    {"trait": "signed_up_at", "op": "before", "ago": "20d"},
    {"trait": "signed_up_at", "op": "after", "value": "2026-02-15T00:00:00Z"},
    {"trait": "account.tier", "op": "equals", "value": "gold"},
    {"profile": "orders_count", "op": "gte", "value": 2},
    {"profile": "revenue", "op": "lt", "value": 100},
    {"profile": "last_order_at", "op": "within", "duration": "14d"},
    {"profile": "first_seen", "op": "before", "ago": "30d"},
    {"performed": "Order Completed"},
    {"performed": "Order Completed", "count": {"op": "exactly", "value": 2}},
    {"performed": "Order Completed", "count": {"op": "at_most", "value": 1}},
    {"performed": "Order Completed", "within": "15d", "count": {"op": "at_least", "value": 1}},
    {
        "performed": "Order Completed",
        "between": {"from": "2026-02-01T00:00:00Z", "to": "2026-02-20T00:00:00Z"},
    },
    {
        "performed": "Order Completed",
        "where": [
            {"property": "category", "op": "in", "values": ["shoes"]},
            {"property": "total", "op": "gt", "value": 40},
        ],
    },
    {"performed": "Signed In", "within": "7d", "count": {"op": "at_least", "value": 2}},
    {"not_performed": "Order Completed", "since": "10d"},
    {"last_performed": "Signed In", "op": "before", "ago": "5d"},
    {"last_performed": "Signed In", "op": "after", "value": "2026-02-25T00:00:00Z"},
    {"random_bucket": {"buckets": 10, "below": 3, "salt": "h"}},
    # Times written without a zone are UTC (a day alone: its midnight), whatever evaluates them.
    {"performed": "Order Completed", "between": {"from": "2026-02-01", "to": "2026-02-20"}},
    {
        "performed": "Order Completed",
        "between": {"from": "2026-02-10T00:00:00", "to": "2026-02-25T12:00:00Z"},
    },
    {"performed": "Signed In", "between": {"to": "2026-02-25T06:00:00"}},
    {"last_performed": "Signed In", "op": "after", "value": "2026-02-25T00:00:00"},
    {"trait": "signed_up_at", "op": "after", "value": "2026-02-15"},
    {
        "and": [
            {"trait": "plan", "op": "equals", "value": "pro"},
            {"not": {"performed": "Order Completed", "within": "5d"}},
        ]
    },
    {
        "or": [
            {"trait": "vip", "op": "equals", "value": True},
            {"not_performed": "Signed In", "since": "3d"},
            {"trait": "signed_up_at", "op": "within", "duration": "4d"},
        ]
    },
]


async def seed_profiles(h: Harness, n: int = 40) -> None:
    rnd = random.Random(7)
    events = []
    for i in range(n):
        uid = f"c{i:03d}"
        traits: dict[str, Any] = {}
        if rnd.random() < 0.8:
            traits["plan"] = rnd.choice(["free", "pro", "team", "Pro", "pro ", 7, None, ["pro"], {"pro": 1}])
        if rnd.random() < 0.7:
            traits["age"] = rnd.choice([25, 30, 30.0, 41, "30", 1e308, -(2**63), 2**63, True, "", None, [30]])
        if rnd.random() < 0.5:
            traits["vip"] = rnd.choice([True, False, 1])
        if rnd.random() < 0.6:
            traits["email"] = f"{uid}@{rnd.choice(['corp.com', 'mail.com'])}"
        if rnd.random() < 0.5:
            traits["tags"] = rnd.sample(["beta", "alpha", "gamma"], rnd.randint(0, 2))
        if rnd.random() < 0.6:
            traits["score"] = rnd.choice([round(rnd.random(), 2), 5e-324, -0.0, "0.4", False])
        if rnd.random() < 0.7:
            traits["signed_up_at"] = rnd.choice(
                [
                    (START - timedelta(days=rnd.randint(0, 40), hours=rnd.randint(0, 23))).isoformat(),
                    "not a date",
                    "2026-02-30",
                    # Placeholders at the ends of time: no timer past the horizon, no overflow.
                    "9999-12-31",
                    "9999-12-31T23:00:00-14:00",
                    "0001-01-01",
                    "2999-12-28T00:00:00Z",
                ]
            )
        if rnd.random() < 0.3:
            traits["account"] = {"tier": rnd.choice(["gold", "silver"])}
        t0 = START - timedelta(days=rnd.randint(0, 45))
        events.append(make_event(f"{uid}-id", "identify", user_id=uid, traits=traits, timestamp=t0))
        for k in range(rnd.randint(0, 4)):
            events.append(
                make_event(
                    f"{uid}-o{k}",
                    "track",
                    user_id=uid,
                    event="Order Completed",
                    properties={
                        "total": rnd.choice([10, 45, 90, 90, "45", 1e308, None, True, -(2**63)]),
                        "category": rnd.choice(["shoes", "books", "books", "Shoes", 3, ["shoes"]]),
                    },
                    timestamp=START - timedelta(days=rnd.randint(0, 40), hours=rnd.randint(0, 23)),
                )
            )
        for k in range(rnd.randint(0, 3)):
            events.append(
                make_event(
                    f"{uid}-s{k}",
                    "track",
                    user_id=uid,
                    event="Signed In",
                    timestamp=START - timedelta(days=rnd.randint(0, 12)),
                )
            )
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(uow, events)


async def assert_agree(h: Harness, ids: list[str], rules: list[Any]) -> list[set[str]]:
    """Each rule's members and due moments, by SQL, the interpreter and the compiled rule; returns the
    members per rule."""
    now = h.clock.now()
    out = []
    async with h.segmenter.platform.unit_of_work() as uow:
        assert len(await profile_store.existing_customer_ids(uow.session, ids)) == len(ids)
        for i, definition in enumerate(rules):
            seg = compile_segment(f"r{i}", "r", 1, definition)
            profiles = await profile_store.lock_profiles(uow.session, ids)
            await fill_snapshots(uow.session, Catalog.build([seg]), profiles, now)
            expected = {cid for cid, p in profiles.items() if evaluate(seg.rule, p, now)}
            got = await segment_store.matching_ids(uow.session, seg.rule, now)
            assert got == expected, (definition, sorted(got ^ expected))
            compiled = {cid for cid, p in profiles.items() if seg.holds(p, now)}
            assert compiled == expected, (definition, sorted(compiled ^ expected))
            due_sql = await segment_store.due_moments(uow.session, seg.rule, now)
            due_py = {cid: next_change_at(seg.rule, p, now) for cid, p in profiles.items()}
            assert due_sql == due_py, definition
            assert {cid: seg.next_change_at(p, now) for cid, p in profiles.items()} == due_py, definition
            out.append(expected)
    return out


async def test_sql_and_python_agree_on_members_and_due_moments(harness: Harness) -> None:
    await seed_profiles(harness)
    members = await assert_agree(harness, [f"c{i:03d}" for i in range(40)], RULES)
    for definition, found in zip(RULES, members, strict=True):
        assert 0 < len(found) < 40, definition  # each rule splits the population


# Texts at the edges of what is a date: Python's datetime and PostgreSQL's parser differ on them.
EDGE_DATES = [
    "2026-02-20T24:00:00",  # PostgreSQL reads the next midnight; Python: no date
    "2026-02-20T23:59:60Z",  # a leap second: the same
    "2026-02-20T10:00:00+16:00",  # offsets past +-15:59: Python reads them, PostgreSQL refused
    "2026-02-20T10:00:00+23:59",
    "2026-02-20T10:00:00-23:59",
    "2026-02-20T10:00+00:60",  # Python: one hour
    "2026-02-20T10:00:00+24:00",  # no date anywhere
    "2026-02-20T10:00:00+15:59",
    "2026-02-20 10:00:00.5Z",
    "2026-02-20T10:60:00",
    "2026-02-20",
]
# Paths through arrays: a plain number indexes one (or names an object's key), as PostgreSQL's `#>`.
ITEMS = [{"sku": "a", "tags": ["x", "y"]}, {"sku": "b"}]
EDGE_TRAITS: list[dict[str, Any]] = [
    {"items": ITEMS},
    {"items": list(reversed(ITEMS))},
    {"items": {"0": {"sku": "a"}, "-1": {"sku": "b"}, "01": {"sku": "b"}}},
    {"items": "a"},
    {"items": [[{"sku": "a"}]]},
    {"items": []},
]
EDGE_RULES: list[Any] = [
    {"trait": "d", "op": "after", "value": "2026-02-19T00:00:00Z"},
    {"trait": "d", "op": "exists"},
    {"trait": "d", "op": "before", "ago": "9d"},
    {"trait": "d", "op": "within", "duration": "10d"},
    {"trait": "items.0.sku", "op": "equals", "value": "a"},
    {"trait": "items.1.sku", "op": "equals", "value": "b"},
    {"trait": "items.-1.sku", "op": "equals", "value": "b"},
    {"trait": "items.01.sku", "op": "equals", "value": "b"},
    {"trait": "items.+1.sku", "op": "exists"},
    {"trait": "items.0.tags.1", "op": "equals", "value": "y"},
    {"trait": "items.0.tags", "op": "contains", "value": "x"},
    {"trait": "items.2.sku", "op": "not_exists"},
    {"trait": "items.0.0.sku", "op": "equals", "value": "a"},
    {"trait": "items.9999999999.sku", "op": "exists"},
    {
        "performed": "Order Completed",
        "where": [{"property": "products.0.category", "op": "equals", "value": "shoes"}],
    },
    {
        "performed": "Order Completed",
        "where": [{"property": "products.1.at", "op": "after", "value": "2026-02-19T00:00:00Z"}],
    },
    {
        "performed": "Order Completed",
        "within": "30d",
        "where": [{"property": "products.0.at", "op": "exists"}],
    },
    {
        "performed": "Order Completed",
        "where": [{"property": "products.1.at", "op": "before", "value": "2026-02-20T10:00:00"}],
    },
    # The ends of what events store (1900-01-01 to 2999-12-31 UTC).
    {"trait": "d", "op": "before", "value": "2999-12-31T23:59:59.999999Z"},
    {"performed": "Order Completed", "between": {"from": "1900-01-01", "to": "2999-12-31T23:00:00-00:59"}},
    {"last_performed": "Order Completed", "op": "after", "value": "1900-01-01T00:00:00Z"},
]


async def test_sql_and_python_agree_on_array_paths_and_edge_dates(harness: Harness) -> None:
    events = []
    ids = []
    for i, d in enumerate(EDGE_DATES):
        uid = f"d{i:02d}"
        ids.append(uid)
        traits = {"d": d, **EDGE_TRAITS[i % len(EDGE_TRAITS)]}
        events.append(make_event(f"{uid}-id", "identify", user_id=uid, traits=traits))
        products = [
            {"category": "shoes" if i % 2 else "books", "at": d},
            {"category": "books", "at": EDGE_DATES[-1 - i]},
        ]
        events.append(
            make_event(
                f"{uid}-o",
                user_id=uid,
                event="Order Completed",
                properties={"products": products if i % 3 else {"0": products[0]}},
                timestamp=START - timedelta(days=i),
            )
        )
    async with harness.segmenter.platform.unit_of_work() as uow:
        await harness.segmenter.events.handle(uow, events)
    members = dict(zip(map(str, EDGE_RULES), await assert_agree(harness, ids, EDGE_RULES), strict=True))
    # What is a date is Python's answer in both paths: not 24:00, not a leap second, not 10:60; offsets
    # up to +-23:59 are.
    after = members[str(EDGE_RULES[0])]
    assert after == {"d02", "d03", "d04", "d05", "d07", "d08", "d10"}
    assert members[str({"trait": "items.0.sku", "op": "equals", "value": "a"})] == {
        "d00",
        "d02",
        "d06",
        "d08",
    }
    # `-1` and `01` are keys, never array indexes; a path goes through nested arrays too.
    assert members[str(EDGE_RULES[6])] == members[str(EDGE_RULES[7])] == {"d02", "d08"}
    assert members[str(EDGE_RULES[12])] == {"d04", "d10"}
    # An event property path through the order's products (or an object's "0" key).
    assert members[str(EDGE_RULES[14])] == {"d01", "d03", "d05", "d07", "d09"}
    everyone = set(ids)
    assert [members[str(r)] for r in EDGE_RULES[-2:]] == [everyone, everyone]


# Numbers past 2**53 (where not every integer is a double) and the same number written 1 and 1.0.
NUMBERS: dict[str, Any] = {
    "n01": 9007199254740993,  # 2**53 + 1: its double is 2**53
    "n02": 9223372036854775807,  # 2**63 - 1: its double is 2**63
    "n03": 1.152921504606847e18,  # written so, read back from jsonb as 1152921504606847000
    "n04": 1.0,
    "n05": 1,
    "n06": 9007199254740992.0,
    "n07": -9223372036854775808,
    "n08": 18446744073709551615,  # 2**64 - 1
    "n09": 0.1,
    "n10": [1.0, 9007199254740993],
}
NUMBER_RULES: list[Any] = [
    {"trait": "n", "op": "gt", "value": 9007199254740992},
    {"trait": "n", "op": "gte", "value": 9007199254740993},
    {"trait": "n", "op": "lt", "value": 9223372036854775808},
    {"trait": "n", "op": "lte", "value": 9223372036854775807},
    {"trait": "n", "op": "gt", "value": 1.1529215046068469e18},
    {"trait": "n", "op": "lt", "value": -9223372036854775807},
    {"trait": "n", "op": "gte", "value": 0.1},
    {"trait": "n", "op": "equals", "value": 9007199254740992},
    {"trait": "n", "op": "equals", "value": 9007199254740993},
    {"trait": "n", "op": "equals", "value": 1},
    {"trait": "n", "op": "equals", "value": 1.0},
    {"trait": "n", "op": "equals", "value": 1152921504606847000},
    {"trait": "n", "op": "equals", "value": 1.152921504606847e18},
    {"trait": "n", "op": "equals", "value": 1152921504606846976},  # 1.152921504606847e18's double
    {"trait": "n", "op": "not_equals", "value": 1},
    {"trait": "n", "op": "in", "values": [1.0, 9007199254740993]},
    {"trait": "n", "op": "in", "values": [9.223372036854776e18, 18446744073709551615]},
    {"trait": "n", "op": "contains", "value": 1},
    {"trait": "n", "op": "contains", "value": 9007199254740992},
]


async def test_sql_and_python_agree_on_numbers_past_2_53_and_on_1_and_1_0(harness: Harness) -> None:
    """gt/gte/lt/lte compare as doubles in every evaluator: SQL casts to float8, Python compared
    exactly, so `9007199254740993 gt 9007199254740992` held in real time and not in back-fill or
    preview. equals/in/contains compare JSON values (1 is 1.0), as jsonb does."""
    # Real time first, on the values as the events carry them (the float 1.152921504606847e18, not the
    # integer jsonb gives back): each rule a segment, every new profile evaluated against them all.
    segments = [await harness.create_segment(rule, name=f"n{i}") for i, rule in enumerate(NUMBER_RULES)]
    events = [make_event(f"{uid}-id", "identify", user_id=uid, traits={"n": n}) for uid, n in NUMBERS.items()]
    async with harness.segmenter.platform.unit_of_work() as uow:
        await harness.segmenter.events.handle(uow, events)
    async with harness.segmenter.platform.unit_of_work() as uow:
        rows = list(
            await uow.session.execute(text("SELECT segment_id, customer_id FROM memberships WHERE is_member"))
        )
    real_time = [{c for s, c in rows if s == sid} for sid in segments]
    # Then the profiles read back from jsonb: SQL, the interpreter and the compiled rules.
    members = await assert_agree(harness, list(NUMBERS), NUMBER_RULES)
    assert real_time == members
    got = {str(r): found for r, found in zip(NUMBER_RULES, members, strict=True)}
    assert got[str(NUMBER_RULES[0])] == {"n02", "n03", "n08"}  # 2**53 + 1 is 2**53 as a double
    assert got[str(NUMBER_RULES[1])] == {"n01", "n02", "n03", "n06", "n08"}
    assert "n02" not in got[str(NUMBER_RULES[2])]  # 2**63 - 1 is 2**63 as a double
    assert got[str(NUMBER_RULES[8])] == {"n01"}  # equality stays exact
    assert got[str(NUMBER_RULES[9])] == got[str(NUMBER_RULES[10])] == {"n04", "n05"}
    assert got[str(NUMBER_RULES[11])] == got[str(NUMBER_RULES[12])] == {"n03"}
    assert got[str(NUMBER_RULES[13])] == set()
    assert got[str(NUMBER_RULES[15])] == {"n01", "n04", "n05"}
    assert got[str(NUMBER_RULES[17])] == {"n10"} and got[str(NUMBER_RULES[18])] == set()


# Dates in conditions anywhere a datetime holds them in UTC, and trait dates at the very same moments:
# "never expires" (9999-12-31), "founded before 1850", and datetime.min / .max themselves, which
# asyncpg would send as -infinity / infinity (the rules' dates go to SQL as text).
FAR_DATES = [
    "1850-01-01",
    "1849-12-31T23:59:59Z",
    "1800-01-01T00:00:00Z",
    "0001-01-01",
    "0001-01-01T00:00:00.000001Z",
    "9999-12-31",
    "9999-12-31T23:59:59.999999",
    "9999-12-31T23:59:59.999998Z",
    "2999-12-31T00:00:00Z",
    "3000-01-01",
]
FAR_RULES: list[Any] = [
    {"trait": "d", "op": "before", "value": "9999-12-31"},
    {"trait": "d", "op": "after", "value": "2999-12-31"},
    {"trait": "d", "op": "before", "value": "1850-01-01"},
    {"trait": "d", "op": "after", "value": "0001-01-01T00:00:00Z"},
    {"trait": "d", "op": "before", "value": "0001-01-01T00:00:00Z"},
    {"trait": "d", "op": "before", "value": "9999-12-31T23:59:59.999999Z"},
    {"trait": "d", "op": "after", "value": "9999-12-31T23:59:59.999998Z"},
    {"trait": "d", "op": "before", "value": "1850-01-01T01:00:00+01:00"},
    {"performed": "Order Completed", "between": {"from": "1800-01-01T00:00:00Z"}},
    {"performed": "Order Completed", "between": {"from": "0001-01-01", "to": "9999-12-31T23:59:59.999999Z"}},
    {"performed": "Order Completed", "between": {"to": "1850-01-01"}},
    {"performed": "Order Completed", "where": [{"property": "at", "op": "before", "value": "9999-12-31"}]},
    {
        "performed": "Order Completed",
        "where": [{"property": "at", "op": "after", "value": "0001-01-01T00:00Z"}],
    },
    {"last_performed": "Order Completed", "op": "before", "value": "9999-12-31"},
    {"last_performed": "Order Completed", "op": "after", "value": "1850-01-01"},
]


async def test_sql_and_python_agree_on_dates_far_in_the_past_and_the_future(harness: Harness) -> None:
    """Rule dates 1900-2999 only were accepted for a while: `valid_until before 9999-12-31` (a common
    "never expires") or `founded before 1850-01-01` had worked, and must keep working, alike in real
    time, back-fill and preview."""
    ids = [f"f{i:02d}" for i in range(len(FAR_DATES))]
    events = []
    for uid, d in zip(ids, FAR_DATES, strict=True):
        events.append(make_event(f"{uid}-id", "identify", user_id=uid, traits={"d": d}))
        events.append(
            make_event(
                f"{uid}-o", user_id=uid, event="Order Completed", properties={"at": d}, timestamp=START
            )
        )
    async with harness.segmenter.platform.unit_of_work() as uow:
        await harness.segmenter.events.handle(uow, events)
    members = dict(zip(map(str, FAR_RULES), await assert_agree(harness, ids, FAR_RULES), strict=True))
    by_date = dict(zip(FAR_DATES, ids, strict=True))

    def of(*dates: str) -> set[str]:
        return {by_date[d] for d in dates}

    everyone = set(ids)
    assert members[str(FAR_RULES[0])] == everyone - of(
        "9999-12-31T23:59:59.999999", "9999-12-31T23:59:59.999998Z"
    )
    assert members[str(FAR_RULES[1])] == of(*FAR_DATES[5:8], "3000-01-01")
    assert members[str(FAR_RULES[2])] == of(
        "1850-01-01", "1849-12-31T23:59:59Z", "1800-01-01T00:00:00Z", *FAR_DATES[3:5]
    )
    # datetime.min and .max as rule dates mean those very moments, not -infinity and infinity.
    assert members[str(FAR_RULES[3])] == everyone - of("0001-01-01")
    assert members[str(FAR_RULES[4])] == of("0001-01-01")
    assert members[str(FAR_RULES[5])] == everyone
    assert members[str(FAR_RULES[6])] == of("9999-12-31T23:59:59.999999")
    assert members[str(FAR_RULES[7])] == members[str(FAR_RULES[2])]
    assert members[str(FAR_RULES[8])] == members[str(FAR_RULES[9])] == everyone
    assert members[str(FAR_RULES[10])] == set()  # no event before 1900 is stored
    assert members[str(FAR_RULES[11])] == members[str(FAR_RULES[0])]
    assert members[str(FAR_RULES[12])] == members[str(FAR_RULES[3])]
    assert members[str(FAR_RULES[13])] == members[str(FAR_RULES[14])] == everyone
