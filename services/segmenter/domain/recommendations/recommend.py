"""Per-customer recommendations: cross-sell from co-purchases and co-views, upsell within a category.

Every recommendation carries its reason ("bought with X by N customers"). Customers with too little
history to score get best sellers in their categories, then best sellers overall. Orders are fully
deterministic: ties break on evidence, then product id.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from decimal import Decimal
from enum import StrEnum
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from services.segmenter.domain.recommendations.catalogue import CatalogueItem
from services.segmenter.domain.recommendations.cooccurrence import (
    CooccurrenceCounts,
    ItemScore,
    ItemSimilarities,
)


class RecommendationSource(StrEnum):
    CO_PURCHASE = "co_purchase"
    CO_VIEW = "co_view"
    CATEGORY_BEST_SELLER = "category_best_seller"
    BEST_SELLER = "best_seller"
    UPSELL = "upsell"


class Recommendation(BaseModel):
    """One product to offer. `score` ranks within its list: the summed item-to-item score for
    co-purchase/co-view, 0 for best-seller fill-ins, the candidate's buyer count for upsell."""

    model_config = ConfigDict(frozen=True)

    product_id: str
    score: float
    source: RecommendationSource
    reason: str
    anchor_product_id: str | None = None  # the customer's product that led here
    support: int  # customers behind the reason (pair support, or buyers for best sellers)
    item: CatalogueItem | None = None  # None when the product is not in the catalogue yet


class CustomerRecommendations(BaseModel):
    model_config = ConfigDict(frozen=True)

    cross_sell: list[Recommendation] = Field(default_factory=list)
    upsell: list[Recommendation] = Field(default_factory=list)

    def as_template_variables(self) -> dict[str, list[dict[str, Any]]]:
        """Flat JSON-able dicts for templates: `{% for p in recommendations.cross_sell limit: 3 %}`
        then `{{ p.name }}`, `{{ p.url }}`, `{{ p.price }}` (a string, exact), `{{ p.reason }}`."""
        return {
            "cross_sell": [_template_entry(r) for r in self.cross_sell],
            "upsell": [_template_entry(r) for r in self.upsell],
        }


def _template_entry(recommendation: Recommendation) -> dict[str, Any]:
    item = recommendation.item or CatalogueItem(product_id=recommendation.product_id)
    entry: dict[str, Any] = item.model_dump(mode="json", exclude={"product_id"})
    entry.update(
        product_id=recommendation.product_id,
        name=item.label,
        reason=recommendation.reason,
        source=recommendation.source.value,
        score=recommendation.score,
    )
    return entry


class CustomerHistory(BaseModel):
    """What one customer bought (owns) and viewed or added to a cart."""

    model_config = ConfigDict(frozen=True)

    purchased: frozenset[str] = frozenset()
    viewed: frozenset[str] = frozenset()


class RecommendParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    cross_sell_limit: int = Field(default=10, ge=1, le=100)
    upsell_limit: int = Field(default=5, ge=1, le=100)
    # A product only viewed is weaker evidence of taste than one bought.
    viewed_anchor_weight: float = Field(default=0.5, ge=0)
    # Fill short cross-sell lists with best sellers (in the customer's categories, then overall).
    cold_start: bool = True
    # Upsell by price: at most this many times the anchor's price (an upgrade, not another league).
    upsell_max_price_ratio: float | None = Field(default=3.0, gt=1)


def _customers(n: int) -> str:
    return f"{n} customer" if n == 1 else f"{n} customers"


def _label(product_id: str, catalogue: Mapping[str, CatalogueItem]) -> str:
    item = catalogue.get(product_id)
    return item.label if item else product_id


class PopularityIndex:
    """Best sellers (by distinct buyers) overall and per category, and the catalogue by category."""

    __slots__ = ("_buyers", "best_sellers", "best_sellers_by_category", "catalogue_by_category")

    def __init__(self, counts: CooccurrenceCounts, catalogue: Mapping[str, CatalogueItem]) -> None:
        self._buyers = counts.purchases.product_customers()
        self.best_sellers = sorted(self._buyers, key=lambda p: (-self._buyers[p], p))
        by_category: dict[str, list[str]] = {}
        for product_id in sorted(catalogue, key=lambda p: (-self.buyers(p), p)):
            category = catalogue[product_id].category
            if category is not None:
                by_category.setdefault(category, []).append(product_id)
        self.catalogue_by_category = by_category
        self.best_sellers_by_category = {
            category: [p for p in products if self.buyers(p) > 0]
            for category, products in by_category.items()
        }

    def buyers(self, product_id: str) -> int:
        return self._buyers.get(product_id, 0)


def customer_categories(history: CustomerHistory, catalogue: Mapping[str, CatalogueItem]) -> list[str]:
    """The customer's categories, most products bought first, then most viewed, then by name."""
    bought: Counter[str] = Counter()
    viewed: Counter[str] = Counter()
    for products, counter in ((history.purchased, bought), (history.viewed, viewed)):
        for product_id in products:
            item = catalogue.get(product_id)
            if item is not None and item.category is not None:
                counter[item.category] += 1
    return sorted(set(bought) | set(viewed), key=lambda c: (-bought[c], -viewed[c], c))


def cross_sell(
    history: CustomerHistory,
    similarities: ItemSimilarities,
    catalogue: Mapping[str, CatalogueItem],
    popularity: PopularityIndex,
    params: RecommendParams,
) -> list[Recommendation]:
    """Top products that go with what the customer bought and viewed, never one they own.

    score(p) = sum over anchors a of weight(a) * item_score(a, p), weight 1 for a product bought
    and `viewed_anchor_weight` for one only viewed. The reason names the anchor contributing most.
    """
    owned = history.purchased
    anchors = [(a, 1.0) for a in sorted(owned)]
    anchors += [(a, params.viewed_anchor_weight) for a in sorted(history.viewed - owned)]
    totals: dict[str, float] = {}
    strongest: dict[str, tuple[float, str, ItemScore]] = {}
    for anchor, weight in anchors:
        if weight <= 0:
            continue
        for scored in similarities.of(anchor):
            product = scored.product_id
            if product in owned:
                continue
            contribution = weight * scored.score
            totals[product] = totals.get(product, 0.0) + contribution
            best = strongest.get(product)
            # Anchors come in a fixed order, so strict > keeps the first of equals: deterministic.
            if best is None or contribution > best[0]:
                strongest[product] = (contribution, anchor, scored)

    def evidence(product: str) -> int:
        scored = strongest[product][2]
        return max(scored.purchase_support, scored.view_support)

    ranked = sorted(totals, key=lambda p: (-totals[p], -evidence(p), p))[: params.cross_sell_limit]
    min_support = similarities.params.min_support
    recommendations = []
    for product in ranked:
        _, anchor, scored = strongest[product]
        if scored.purchase_support >= min_support and scored.purchase_score > 0:
            source, verb, support = RecommendationSource.CO_PURCHASE, "bought", scored.purchase_support
        else:
            source, verb, support = RecommendationSource.CO_VIEW, "viewed", scored.view_support
        recommendations.append(
            Recommendation(
                product_id=product,
                score=totals[product],
                source=source,
                reason=f"{verb} with {_label(anchor, catalogue)} by {_customers(support)}",
                anchor_product_id=anchor,
                support=support,
                item=catalogue.get(product),
            )
        )
    if params.cold_start and len(recommendations) < params.cross_sell_limit:
        taken = owned | set(ranked)
        room = params.cross_sell_limit - len(recommendations)
        recommendations += best_seller_fill(history, catalogue, popularity, exclude=taken, limit=room)
    return recommendations


def best_seller_fill(
    history: CustomerHistory,
    catalogue: Mapping[str, CatalogueItem],
    popularity: PopularityIndex,
    exclude: Iterable[str],
    limit: int,
) -> list[Recommendation]:
    """Cold start: best sellers in the customer's categories (their main category first), then overall."""
    taken = set(exclude)
    out: list[Recommendation] = []
    for category in customer_categories(history, catalogue):
        for product in popularity.best_sellers_by_category.get(category, []):
            if len(out) >= limit:
                return out
            if product not in taken:
                taken.add(product)
                buyers = popularity.buyers(product)
                out.append(
                    Recommendation(
                        product_id=product,
                        score=0.0,
                        source=RecommendationSource.CATEGORY_BEST_SELLER,
                        reason=f"best seller in {category}: bought by {_customers(buyers)}",
                        support=buyers,
                        item=catalogue.get(product),
                    )
                )
    for product in popularity.best_sellers:
        if len(out) >= limit:
            break
        if product not in taken:
            taken.add(product)
            buyers = popularity.buyers(product)
            out.append(
                Recommendation(
                    product_id=product,
                    score=0.0,
                    source=RecommendationSource.BEST_SELLER,
                    reason=f"best seller: bought by {_customers(buyers)}",
                    support=buyers,
                    item=catalogue.get(product),
                )
            )
    return out


def _rank_in_category(item: CatalogueItem) -> tuple[int, Decimal]:
    return (item.tier if item.tier is not None else -1, item.price if item.price is not None else Decimal(-1))


class _Upgrade(NamedTuple):
    reason: str
    by_tier: bool


def _upgrade(anchor: CatalogueItem, candidate: CatalogueItem, max_ratio: float | None) -> _Upgrade | None:
    """Why `candidate` upgrades `anchor`, or None if it does not (same category assumed)."""
    if anchor.tier is not None and candidate.tier is not None:
        if candidate.tier > anchor.tier:
            return _Upgrade(f"higher tier ({candidate.tier} vs {anchor.tier})", by_tier=True)
        return None
    if anchor.price is None or candidate.price is None or candidate.price <= anchor.price:
        return None
    if (
        max_ratio is not None
        and anchor.price > 0
        and candidate.price > anchor.price * Decimal(str(max_ratio))
    ):
        return None
    return _Upgrade(f"higher price ({candidate.price} vs {anchor.price})", by_tier=False)


def upsell(
    history: CustomerHistory,
    catalogue: Mapping[str, CatalogueItem],
    popularity: PopularityIndex,
    params: RecommendParams,
) -> list[Recommendation]:
    """Upgrades of the customer's products: same category, higher tier (when both products have
    one) or else higher price (up to `upsell_max_price_ratio` times). The anchor in each category
    is the customer's best product there (bought, else viewed), so we never offer a step the
    customer has already taken. Tier upgrades rank first (a tier says "same line, better"; a
    higher price alone may be a different kind of product), then by candidate buyers, then
    smallest price step up, then id."""
    anchors: dict[str, CatalogueItem] = {}
    for products in (history.purchased, history.viewed):
        per_category: dict[str, CatalogueItem] = {}
        for product_id in sorted(products):
            item = catalogue.get(product_id)
            if item is None or item.category is None or item.category in anchors:
                continue
            current = per_category.get(item.category)
            if current is None or _rank_in_category(item) > _rank_in_category(current):
                per_category[item.category] = item
        anchors.update(per_category)

    candidates: dict[str, tuple[tuple[bool, int, Decimal, str], Recommendation]] = {}
    for category in sorted(anchors):
        anchor = anchors[category]
        for product in popularity.catalogue_by_category.get(category, []):
            if product in history.purchased or product == anchor.product_id:
                continue
            item = catalogue[product]
            upgrade = _upgrade(anchor, item, params.upsell_max_price_ratio)
            if upgrade is None:
                continue
            buyers = popularity.buyers(product)
            step = (item.price or Decimal(0)) - (anchor.price or Decimal(0))
            candidates[product] = (
                (not upgrade.by_tier, -buyers, step, product),
                Recommendation(
                    product_id=product,
                    score=float(buyers),
                    source=RecommendationSource.UPSELL,
                    reason=f"upgrade from {anchor.label}: {upgrade.reason} in {category}",
                    anchor_product_id=anchor.product_id,
                    support=buyers,
                    item=item,
                ),
            )
    ranked = sorted(candidates.values(), key=lambda entry: entry[0])
    return [recommendation for _, recommendation in ranked[: params.upsell_limit]]


def recommend_for_customer(
    history: CustomerHistory,
    similarities: ItemSimilarities,
    catalogue: Mapping[str, CatalogueItem],
    popularity: PopularityIndex,
    params: RecommendParams,
) -> CustomerRecommendations:
    return CustomerRecommendations(
        cross_sell=cross_sell(history, similarities, catalogue, popularity, params),
        upsell=upsell(history, catalogue, popularity, params),
    )
