"""Every SQL query of the catalogue and recommendations: catalogue items, what each customer bought
and viewed, the co-occurrence count tables (incremental upserts and the full recompute) and the
stored per-customer recommendation lists. Set-based: arrays in, one statement per table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.segmenter.domain.recommendations.catalogue import CatalogueItem, InteractionKind
from services.segmenter.domain.recommendations.recommend import CustomerHistory
from services.segmenter.domain.recommendations.stored import CountIncrements

ITEM_COLUMNS = "product_id, sku, name, category, price, brand, url, image_url, tier"
_ITEM_FIELDS = ("sku", "name", "category", "price", "brand", "url", "image_url", "tier")


def _item(row: Any) -> CatalogueItem:
    data = {f: getattr(row, f) for f in ("product_id", *_ITEM_FIELDS) if getattr(row, f) is not None}
    return CatalogueItem.model_construct(_fields_set=set(data), **data)


# --------------------------------------------------------------------------- catalogue items


async def upsert_items(session: AsyncSession, items: Sequence[CatalogueItem], now: datetime) -> None:
    """Insert or update items (one per product id); fields an item leaves unset keep their value,
    as `CatalogueItem.merged_with` does. Sorted by id so concurrent writers lock in one order."""
    if not items:
        return
    ordered = sorted(items, key=lambda i: i.product_id)
    cols: dict[str, list[Any]] = {f: [] for f in ("product_id", *_ITEM_FIELDS)}
    for item in ordered:
        cols["product_id"].append(item.product_id)
        for f in _ITEM_FIELDS:
            value = getattr(item, f)
            cols[f].append(str(value) if isinstance(value, Decimal) else value)
    await session.execute(
        text(
            f"INSERT INTO catalogue_items ({ITEM_COLUMNS}, updated_at) "
            "SELECT product_id, sku, name, category, CAST(price AS numeric), brand, url, image_url, tier, "
            ":now FROM unnest(CAST(:product_id AS text[]), CAST(:sku AS text[]), CAST(:name AS text[]), "
            "CAST(:category AS text[]), CAST(:price AS text[]), CAST(:brand AS text[]), "
            "CAST(:url AS text[]), "
            "CAST(:image_url AS text[]), CAST(:tier AS integer[])) "
            "AS q(product_id, sku, name, category, price, brand, url, image_url, tier) "
            "ON CONFLICT (product_id) DO UPDATE SET "
            + ", ".join(f"{f} = coalesce(EXCLUDED.{f}, catalogue_items.{f})" for f in _ITEM_FIELDS)
            + ", updated_at = EXCLUDED.updated_at"
        ),
        {**cols, "now": now},
    )


async def get_item(session: AsyncSession, product_id: str) -> CatalogueItem | None:
    row = (
        await session.execute(
            text(f"SELECT {ITEM_COLUMNS} FROM catalogue_items WHERE product_id = :p"), {"p": product_id}
        )
    ).first()
    return _item(row) if row else None


async def list_items(
    session: AsyncSession, category: str | None, after: str | None, limit: int
) -> list[CatalogueItem]:
    rows = await session.execute(
        text(
            f"SELECT {ITEM_COLUMNS} FROM catalogue_items "
            "WHERE (CAST(:cat AS text) IS NULL OR category = :cat) "
            "AND (CAST(:after AS text) IS NULL OR product_id > :after) ORDER BY product_id LIMIT :limit"
        ),
        {"cat": category, "after": after, "limit": limit},
    )
    return [_item(r) for r in rows]


async def items_for(
    session: AsyncSession, product_ids: Iterable[str], categories: Iterable[str]
) -> dict[str, CatalogueItem]:
    """The items with these ids, plus every item of these categories (upsell candidates)."""
    rows = await session.execute(
        text(
            f"SELECT {ITEM_COLUMNS} FROM catalogue_items WHERE product_id = ANY(CAST(:ids AS text[])) "
            "OR category = ANY(CAST(:cats AS text[]))"
        ),
        {"ids": sorted(set(product_ids)), "cats": sorted(set(categories))},
    )
    return {r.product_id: _item(r) for r in rows}


# --------------------------------------------------------------------------- customers' products


async def owned(
    session: AsyncSession, customer_ids: Iterable[str]
) -> dict[tuple[str, InteractionKind], set[str]]:
    rows = await session.execute(
        text(
            "SELECT customer_id, kind, product_id FROM customer_products "
            "WHERE customer_id = ANY(CAST(:ids AS text[]))"
        ),
        {"ids": sorted(set(customer_ids))},
    )
    out: dict[tuple[str, InteractionKind], set[str]] = {}
    for cid, kind, product in rows:
        out.setdefault((cid, InteractionKind(kind)), set()).add(product)
    return out


async def histories(session: AsyncSession, customer_ids: Iterable[str]) -> dict[str, CustomerHistory]:
    ids = sorted(set(customer_ids))
    found = await owned(session, ids)
    return {
        cid: CustomerHistory(
            purchased=frozenset(found.get((cid, InteractionKind.PURCHASE), ())),
            viewed=frozenset(found.get((cid, InteractionKind.VIEW), ())),
        )
        for cid in ids
    }


async def apply_increments(session: AsyncSession, inc: CountIncrements, now: datetime) -> None:
    """The new (customer, product) rows and the count increments, each table in one statement,
    rows in key order (concurrent units of work lock hot count rows in the same order)."""
    if not inc.new_rows:
        return
    rows = sorted(inc.new_rows)
    await session.execute(
        text(
            "INSERT INTO customer_products (customer_id, kind, product_id, first_at) "
            "SELECT c, k, p, :now FROM unnest(CAST(:c AS text[]), CAST(:k AS text[]), CAST(:p AS text[])) "
            "AS q(c, k, p) ON CONFLICT DO NOTHING"
        ),
        {"c": [r[0] for r in rows], "k": [r[1].value for r in rows], "p": [r[2] for r in rows], "now": now},
    )
    products = sorted(inc.products.items())
    await session.execute(
        text(
            "INSERT INTO product_counts (signal, product_id, customers) "
            "SELECT s, p, n FROM unnest(CAST(:s AS text[]), CAST(:p AS text[]), CAST(:n AS integer[])) "
            "AS q(s, p, n) ON CONFLICT (signal, product_id) "
            "DO UPDATE SET customers = product_counts.customers + EXCLUDED.customers"
        ),
        {
            "s": [k[0].value for k, _ in products],
            "p": [k[1] for k, _ in products],
            "n": [n for _, n in products],
        },
    )
    pairs = sorted(inc.pairs.items())
    if pairs:
        await session.execute(
            text(
                "INSERT INTO product_pairs (signal, a, b, customers) "
                "SELECT s, a, b, n FROM unnest(CAST(:s AS text[]), CAST(:a AS text[]), CAST(:b AS text[]), "
                "CAST(:n AS integer[])) AS q(s, a, b, n) ON CONFLICT (signal, a, b) "
                "DO UPDATE SET customers = product_pairs.customers + EXCLUDED.customers"
            ),
            {
                "s": [k[0].value for k, _ in pairs],
                "a": [k[1] for k, _ in pairs],
                "b": [k[2] for k, _ in pairs],
                "n": [n for _, n in pairs],
            },
        )


async def move_products(session: AsyncSession, merges: Sequence[tuple[str, str]]) -> None:
    """Merged profiles: the merged-away customer's products become the survivor's. The counts are
    left as they are (the survivor's pairs with the moved products are added by the next full
    recompute)."""
    for from_id, into_id in merges:
        await session.execute(
            text(
                "WITH moved AS (DELETE FROM customer_products WHERE customer_id = :f "
                "RETURNING kind, product_id, first_at) "
                "INSERT INTO customer_products (customer_id, kind, product_id, first_at) "
                "SELECT :i, kind, product_id, first_at FROM moved ON CONFLICT DO NOTHING"
            ),
            {"f": from_id, "i": into_id},
        )
        await session.execute(
            text("DELETE FROM customer_recommendations WHERE customer_id = :f"), {"f": from_id}
        )


# --------------------------------------------------------------------------- counts


async def pairs_of(
    session: AsyncSession, anchors: Iterable[str]
) -> dict[InteractionKind, list[tuple[str, str, int]]]:
    rows = await session.execute(
        text(
            "SELECT signal, a, b, customers FROM product_pairs WHERE a = ANY(CAST(:ids AS text[])) "
            "AND customers > 0"
        ),
        {"ids": sorted(set(anchors))},
    )
    out: dict[InteractionKind, list[tuple[str, str, int]]] = {}
    for signal, a, b, n in rows:
        out.setdefault(InteractionKind(signal), []).append((a, b, n))
    return out


async def product_counts(
    session: AsyncSession, product_ids: Iterable[str]
) -> dict[InteractionKind, dict[str, int]]:
    rows = await session.execute(
        text(
            "SELECT signal, product_id, customers FROM product_counts "
            "WHERE product_id = ANY(CAST(:ids AS text[]))"
        ),
        {"ids": sorted(set(product_ids))},
    )
    out: dict[InteractionKind, dict[str, int]] = {}
    for signal, product, n in rows:
        out.setdefault(InteractionKind(signal), {})[product] = n
    return out


async def top_sellers(session: AsyncSession, limit: int) -> list[str]:
    rows = await session.execute(
        text(
            "SELECT product_id FROM product_counts WHERE signal = 'purchase' AND customers > 0 "
            "ORDER BY customers DESC, product_id LIMIT :n"
        ),
        {"n": limit},
    )
    return [r[0] for r in rows]


async def customer_totals(session: AsyncSession) -> dict[InteractionKind, int]:
    """N per signal (only lift needs it)."""
    rows = await session.execute(
        text("SELECT kind, count(DISTINCT customer_id) FROM customer_products GROUP BY kind")
    )
    return {InteractionKind(k): n for k, n in rows}


async def recompute_counts(session: AsyncSession) -> tuple[int, int]:
    """Full recompute from `customer_products` (the SQL form of X^T X). Takes the count tables
    exclusively, so concurrent incremental upserts wait and then apply on top of the new counts."""
    await session.execute(text("LOCK TABLE product_counts, product_pairs IN EXCLUSIVE MODE"))
    await session.execute(text("DELETE FROM product_counts"))
    await session.execute(text("DELETE FROM product_pairs"))
    products = await session.execute(
        text(
            "INSERT INTO product_counts (signal, product_id, customers) "
            "SELECT kind, product_id, count(*) FROM customer_products GROUP BY kind, product_id"
        )
    )
    pairs = await session.execute(
        text(
            "INSERT INTO product_pairs (signal, a, b, customers) "
            "SELECT x.kind, x.product_id, y.product_id, count(*) FROM customer_products x "
            "JOIN customer_products y ON y.customer_id = x.customer_id AND y.kind = x.kind "
            "AND y.product_id <> x.product_id GROUP BY x.kind, x.product_id, y.product_id"
        )
    )
    return int(getattr(products, "rowcount", 0) or 0), int(getattr(pairs, "rowcount", 0) or 0)


async def customer_ids_after(session: AsyncSession, after: str | None, limit: int) -> list[str]:
    rows = await session.execute(
        text(
            "SELECT customer_id FROM customers WHERE (CAST(:after AS text) IS NULL OR customer_id > :after) "
            "ORDER BY customer_id LIMIT :n"
        ),
        {"after": after, "n": limit},
    )
    return [r[0] for r in rows]


# --------------------------------------------------------------------------- stored recommendations


@dataclass(frozen=True)
class StoredRecommendations:
    customer_id: str
    cross_sell: list[dict[str, Any]]
    upsell: list[dict[str, Any]]

    def as_template_variables(self) -> dict[str, list[dict[str, Any]]]:
        return {"cross_sell": self.cross_sell, "upsell": self.upsell}


def _categories(entries: list[dict[str, Any]]) -> list[str]:
    return sorted({e["category"] for e in entries if e.get("category")})


class SavedLists(NamedTuple):
    previous: dict[str, list[dict[str, Any]]] | None  # the lists replaced (None: there were none)
    at: datetime  # what the lists are dated by (`updated_at`), and announced with


async def save_recommendations(
    session: AsyncSession,
    lists: Mapping[str, dict[str, list[dict[str, Any]]]],
    as_of: Mapping[str, datetime],
) -> dict[str, SavedLists]:
    """Store each customer's lists, dated by `as_of` (the profile's last change, whose traits their
    announcement carries) or by the date of the lists they replace where that is later: a consumer
    keeping the newest lists (the notifier) never takes them for older than those. Lists stored by
    a release that dated them by its clock (later than the profile's last change) are replaced the
    same way."""
    if not lists:
        return {}
    ids = sorted(lists)
    saved = {cid: SavedLists(None, as_of[cid]) for cid in ids}
    rows = await session.execute(
        text(
            "SELECT customer_id, cross_sell, upsell, updated_at FROM customer_recommendations "
            "WHERE customer_id = ANY(CAST(:ids AS text[])) ORDER BY customer_id FOR UPDATE"
        ),
        {"ids": ids},
    )
    for cid, cross, up, at in rows:
        saved[cid] = SavedLists({"cross_sell": cross, "upsell": up}, max(as_of[cid], at))
    await session.execute(
        text(
            "INSERT INTO customer_recommendations "
            "(customer_id, cross_sell, upsell, cross_sell_categories, upsell_categories, updated_at) "
            "SELECT c, x, u, "
            "ARRAY(SELECT jsonb_array_elements_text(CAST(xc AS jsonb))), "
            "ARRAY(SELECT jsonb_array_elements_text(CAST(uc AS jsonb))), a "
            "FROM unnest(CAST(:c AS text[]), CAST(:x AS jsonb[]), CAST(:u AS jsonb[]), CAST(:xc AS text[]), "
            "CAST(:uc AS text[]), CAST(:a AS timestamptz[])) AS q(c, x, u, xc, uc, a) "
            "ON CONFLICT (customer_id) DO UPDATE SET cross_sell = EXCLUDED.cross_sell, "
            "upsell = EXCLUDED.upsell, "
            "cross_sell_categories = EXCLUDED.cross_sell_categories, "
            "upsell_categories = EXCLUDED.upsell_categories, updated_at = EXCLUDED.updated_at"
        ),
        {
            "c": ids,
            "x": [orjson.dumps(lists[c]["cross_sell"]).decode() for c in ids],
            "u": [orjson.dumps(lists[c]["upsell"]).decode() for c in ids],
            "xc": [orjson.dumps(_categories(lists[c]["cross_sell"])).decode() for c in ids],
            "uc": [orjson.dumps(_categories(lists[c]["upsell"])).decode() for c in ids],
            "a": [saved[c].at for c in ids],
        },
    )
    return saved


async def stored_recommendations(session: AsyncSession, customer_id: str) -> StoredRecommendations | None:
    row = (
        await session.execute(
            text("SELECT cross_sell, upsell FROM customer_recommendations WHERE customer_id = :c"),
            {"c": customer_id},
        )
    ).first()
    return StoredRecommendations(customer_id, row[0], row[1]) if row else None


async def recommendation_categories(
    session: AsyncSession, customer_ids: Iterable[str]
) -> dict[str, dict[str, set[str]]]:
    """Per customer, the categories of their current cross-sell and upsell lists (segment rules)."""
    rows = await session.execute(
        text(
            "SELECT customer_id, cross_sell_categories, upsell_categories, "
            "jsonb_array_length(cross_sell) > 0, jsonb_array_length(upsell) > 0 "
            "FROM customer_recommendations WHERE customer_id = ANY(CAST(:ids AS text[]))"
        ),
        {"ids": sorted(set(customer_ids))},
    )
    out: dict[str, dict[str, set[str]]] = {}
    for cid, cross, up, any_cross, any_up in rows:
        # "*" marks a non-empty list, for rules without a category.
        out[cid] = {
            "cross_sell": set(cross) | ({"*"} if any_cross else set()),
            "upsell": set(up) | ({"*"} if any_up else set()),
        }
    return out


async def lock_customers(
    session: AsyncSession, customer_ids: Sequence[str]
) -> dict[str, tuple[dict[str, Any], datetime]]:
    """These customers' traits and when their profile last changed, the rows held FOR SHARE until
    commit, in id order as the event path locks them (`store.profiles.lock_profiles`, FOR UPDATE):
    no change of theirs commits meanwhile, and what is announced with them goes out before the next
    one. A customer merged away since is left out. The locked rows are read as the lock holder left
    them (a statement's other reads would not be: they keep the snapshot it started with)."""
    rows = await session.execute(
        text(
            "SELECT customer_id, traits, updated_at FROM customers "
            "WHERE customer_id = ANY(CAST(:ids AS text[])) ORDER BY customer_id FOR SHARE"
        ),
        {"ids": sorted(set(customer_ids))},
    )
    return {r[0]: (dict(r[1] or {}), r[2]) for r in rows}
