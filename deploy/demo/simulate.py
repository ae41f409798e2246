"""Simulated customers for the demo and the end-to-end benchmark: realistic Segment events.

Each customer walks part of the lifecycle: anonymous browsing, sign-up, carts (some abandoned),
orders (some repeat), a survey answer, and for some, silence (they drift towards churn).
Deterministic for a given seed, so a demo can be replayed.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

FIRST = [
    "Ada",
    "Grace",
    "Alan",
    "Edsger",
    "Barbara",
    "Donald",
    "Margaret",
    "Ken",
    "Radia",
    "Linus",
    "Frances",
    "John",
    "Sophie",
    "Tim",
    "Katherine",
    "Dennis",
    "Hedy",
    "Claude",
    "Anita",
    "Guido",
]
LAST = [
    "Lovelace",
    "Hopper",
    "Turing",
    "Dijkstra",
    "Liskov",
    "Knuth",
    "Hamilton",
    "Thompson",
    "Perlman",
    "Torvalds",
    "Allen",
    "McCarthy",
    "Wilson",
    "Berners-Lee",
    "Johnson",
    "Ritchie",
    "Lamarr",
    "Shannon",
]
TIMEZONES = [
    "Europe/Paris",
    "Europe/London",
    "America/New_York",
    "America/Los_Angeles",
    "Asia/Tokyo",
    "Europe/Berlin",
    "Australia/Sydney",
]
LOCALES = ["en", "en", "en", "fr", "de", "ja"]

# A small catalogue with complementary pairs, so cross-sell has something to learn.
CATALOGUE: list[dict[str, Any]] = [
    {
        "product_id": "p-espresso",
        "name": "Espresso machine",
        "category": "coffee",
        "price": 249.0,
        "brand": "Brew",
    },
    {
        "product_id": "p-grinder",
        "name": "Burr grinder",
        "category": "coffee",
        "price": 129.0,
        "brand": "Brew",
    },
    {
        "product_id": "p-beans",
        "name": "Single-origin beans",
        "category": "coffee",
        "price": 18.0,
        "brand": "Roast",
    },
    {"product_id": "p-cups", "name": "Espresso cups", "category": "coffee", "price": 24.0, "brand": "Brew"},
    {
        "product_id": "p-tent",
        "name": "Two-person tent",
        "category": "outdoor",
        "price": 199.0,
        "brand": "Trail",
    },
    {"product_id": "p-bag", "name": "Sleeping bag", "category": "outdoor", "price": 89.0, "brand": "Trail"},
    {
        "product_id": "p-stove",
        "name": "Camping stove",
        "category": "outdoor",
        "price": 59.0,
        "brand": "Trail",
    },
    {"product_id": "p-lamp", "name": "Head lamp", "category": "outdoor", "price": 29.0, "brand": "Trail"},
    {"product_id": "p-book", "name": "Field guide", "category": "books", "price": 22.0, "brand": "Press"},
    {"product_id": "p-novel", "name": "Novel", "category": "books", "price": 15.0, "brand": "Press"},
]
COMPLEMENTS = {
    "p-espresso": ["p-grinder", "p-beans", "p-cups"],
    "p-grinder": ["p-beans"],
    "p-tent": ["p-bag", "p-stove"],
    "p-bag": ["p-lamp"],
    "p-stove": ["p-lamp"],
    "p-book": ["p-novel"],
}


@dataclass(frozen=True)
class Customer:
    user_id: str
    anonymous_id: str
    first_name: str
    last_name: str
    email: str
    timezone: str
    locale: str
    # How engaged this customer is: drives orders, repeat purchases and going silent.
    loyalty: float


def customers(n: int, seed: int = 7) -> list[Customer]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        out.append(
            Customer(
                user_id=f"demo-{i:05d}",
                anonymous_id=str(uuid.UUID(int=rng.getrandbits(128))),
                first_name=first,
                last_name=last,
                email=f"{first.lower()}.{last.lower()}.{i}@example.com",
                timezone=rng.choice(TIMEZONES),
                locale=rng.choice(LOCALES),
                loyalty=rng.betavariate(2, 3),
            )
        )
    return out


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def journey_of(c: Customer, rng: random.Random, start: datetime, now: datetime) -> Iterator[dict[str, Any]]:
    """The events of one customer between `start` and `now`, in time order."""
    # Sign-ups spread over nearly the whole period, so some are recent (the welcome series is for
    # customers who signed up in the last 7 days; with --days 30, about one in five).
    t = start + timedelta(hours=rng.uniform(0, max(1.0, (now - start).total_seconds() / 3600 * 0.95)))

    def ev(kind: str, **fields: Any) -> dict[str, Any]:
        return {
            "type": kind,
            "messageId": str(uuid.UUID(int=rng.getrandbits(128))),
            "timestamp": _iso(t),
            **fields,
        }

    for _ in range(rng.randint(1, 3)):
        p = rng.choice(CATALOGUE)
        yield ev(
            "page", anonymousId=c.anonymous_id, name="Product", properties={"path": f"/p/{p['product_id']}"}
        )
        yield ev("track", anonymousId=c.anonymous_id, event="Product Viewed", properties=dict(p))
        t += timedelta(minutes=rng.uniform(1, 30))
    yield ev(
        "identify",
        userId=c.user_id,
        anonymousId=c.anonymous_id,
        traits={
            "email": c.email,
            "first_name": c.first_name,
            "last_name": c.last_name,
            "name": f"{c.first_name} {c.last_name}",
            "timezone": c.timezone,
            "locale": c.locale,
            "created_at": _iso(t),
        },
    )
    yield ev(
        "track", userId=c.user_id, event="Signed Up", properties={"method": rng.choice(["email", "google"])}
    )
    orders = 0
    while t < now:
        t += timedelta(days=rng.expovariate(1 / (10 + 60 * (1 - c.loyalty))))
        if t >= now:
            break
        if rng.random() > 0.35 + 0.6 * c.loyalty:
            break  # drifts away: no more activity, churn risk grows
        first = rng.choice(CATALOGUE)
        basket = [first] + [
            q
            for q in CATALOGUE
            if q["product_id"] in COMPLEMENTS.get(first["product_id"], []) and rng.random() < 0.5
        ]
        cart_id = f"cart-{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}"
        for item in basket:
            yield ev(
                "track", userId=c.user_id, event="Product Added", properties={**item, "cart_id": cart_id}
            )
            t += timedelta(minutes=rng.uniform(0.5, 5))
        if rng.random() < 0.3:
            continue  # abandoned cart
        revenue = round(sum(float(q["price"]) for q in basket), 2)
        orders += 1
        yield ev(
            "track",
            userId=c.user_id,
            event="Checkout Started",
            properties={"cart_id": cart_id, "value": revenue},
        )
        yield ev(
            "track",
            userId=c.user_id,
            event="Order Completed",
            properties={
                "order_id": f"o-{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}",
                "cart_id": cart_id,
                "revenue": revenue,
                "currency": "EUR",
                "products": [{**q, "quantity": 1} for q in basket],
            },
        )
        if orders == 1 and rng.random() < 0.5:
            t += timedelta(days=rng.uniform(3, 14))
            score = min(10, max(0, round(rng.gauss(5 + 5 * c.loyalty, 2))))
            yield ev(
                "track",
                userId=c.user_id,
                event="Survey Responded",
                properties={"survey_type": "nps", "score": score, "comment": ""},
            )


def events(
    n_customers: int, *, seed: int = 7, days: int = 180, now: datetime | None = None
) -> list[dict[str, Any]]:
    """All simulated events, ordered by time across customers."""
    rng = random.Random(seed)
    now = now or datetime.now(UTC)
    start = now - timedelta(days=days)
    out = [e for c in customers(n_customers, seed) for e in journey_of(c, rng, start, now)]
    out.sort(key=lambda e: e["timestamp"])
    return out
