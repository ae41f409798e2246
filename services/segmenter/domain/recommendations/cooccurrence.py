"""Item-to-item scores from customers who bought (or viewed) both products.

Counts are per customer, not per order: a customer who bought A and B counts once for the pair
however many times they bought them, so one loyal customer cannot make a pair look popular.

Two ways to get the same counts: `add` one customer's new basket at a time (what the event
consumer does; it only touches the pairs the new products form), or `from_histories` over every
customer's full history (a sparse matrix product, for a scheduled recompute or a backfill).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from enum import StrEnum
from itertools import combinations
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import sparse


class SimilarityMeasure(StrEnum):
    # n_ab / sqrt(n_a * n_b): for a fixed anchor a, candidates are damped by sqrt(popularity).
    COSINE = "cosine"
    # n_ab * N / (n_a * n_b): candidates damped by their full popularity; favours rare items.
    LIFT = "lift"


class ScoringParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    measure: SimilarityMeasure = SimilarityMeasure.COSINE
    # A pair seen for fewer customers than this scores 0 (one-off coincidences do not count).
    min_support: int = Field(default=2, ge=1)
    # Co-views say "considered together", a weaker signal than "bought together".
    view_weight: float = Field(default=0.3, ge=0)


class BasketDelta(NamedTuple):
    """What one customer's new basket adds: products new to them, and the pairs those form."""

    new_products: list[str]
    new_pairs: list[tuple[str, str]]  # each (a, b) with a < b


def basket_delta(already: AbstractSet[str], basket: Iterable[str]) -> BasketDelta:
    """The count increments a basket causes for a customer who already has `already`.

    Each new product gets +1 customer; each pair it forms with an old or another new product
    gets +1 customer. Pairs of old products are untouched: that customer was already counted.
    """
    new = sorted(set(basket) - already)
    pairs = [_ordered(old, product) for product in new for old in already]
    pairs.extend(combinations(new, 2))
    return BasketDelta(new, pairs)


def _ordered(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


class PairCounts:
    """Customer counts of one signal (purchases or views): per product, and per pair of products."""

    __slots__ = ("_customers_of", "_pairs", "_products_of")

    def __init__(self) -> None:
        self._products_of: dict[str, set[str]] = {}
        self._customers_of: dict[str, int] = {}
        self._pairs: dict[str, dict[str, int]] = {}  # symmetric adjacency: _pairs[a][b] == _pairs[b][a]

    # ----------------------------------------------------------------------- building

    def add(self, customer: str, basket: Iterable[str]) -> BasketDelta:
        """Account for `customer` having bought (viewed) `basket`; returns the increments applied."""
        owned = self._products_of.get(customer, set())
        delta = basket_delta(owned, basket)
        if not delta.new_products:
            return delta
        for product in delta.new_products:
            self._customers_of[product] = self._customers_of.get(product, 0) + 1
        for a, b in delta.new_pairs:
            self._bump(a, b, 1)
        self._products_of[customer] = owned | set(delta.new_products)
        return delta

    def remove_customer(self, customer: str) -> None:
        """Forget a customer entirely (erasure): the counts become as if they never existed."""
        owned = self._products_of.pop(customer, set())
        for product in owned:
            self._customers_of[product] -= 1
            if not self._customers_of[product]:
                del self._customers_of[product]
        for a, b in combinations(sorted(owned), 2):
            self._bump(a, b, -1)

    def _bump(self, a: str, b: str, by: int) -> None:
        for x, y in ((a, b), (b, a)):
            row = self._pairs.setdefault(x, {})
            count = row.get(y, 0) + by
            if count:
                row[y] = count
            else:
                del row[y]
                if not row:
                    del self._pairs[x]

    @classmethod
    def from_histories(cls, histories: Mapping[str, Iterable[str]]) -> PairCounts:
        """Full recompute: with X the customer x product 0/1 matrix, X^T X holds every count."""
        counts = cls()
        product_index: dict[str, int] = {}
        rows: list[int] = []
        cols: list[int] = []
        customers = 0
        for customer, history in histories.items():
            products = set(history)
            if not products:
                continue
            counts._products_of[customer] = products
            for product in products:
                rows.append(customers)
                cols.append(product_index.setdefault(product, len(product_index)))
            customers += 1
        if not product_index:
            return counts
        products_by_index = list(product_index)
        matrix = sparse.csr_matrix(
            (np.ones(len(rows), dtype=np.int64), (rows, cols)), shape=(customers, len(product_index))
        )
        gram = (matrix.T @ matrix).tocoo()
        for i, j, value in zip(gram.row.tolist(), gram.col.tolist(), gram.data.tolist(), strict=True):
            if i == j:
                counts._customers_of[products_by_index[i]] = value
            else:
                counts._pairs.setdefault(products_by_index[i], {})[products_by_index[j]] = value
        return counts

    # ----------------------------------------------------------------------- reading

    @property
    def customer_total(self) -> int:
        """N: customers with at least one product in this signal."""
        return len(self._products_of)

    def products_of(self, customer: str) -> frozenset[str]:
        return frozenset(self._products_of.get(customer, ()))

    def customers_of(self, product: str) -> int:
        return self._customers_of.get(product, 0)

    def product_customers(self) -> Mapping[str, int]:
        return self._customers_of

    def support(self, a: str, b: str) -> int:
        """Customers who have both a and b."""
        return self._pairs.get(a, {}).get(b, 0)

    def neighbours(self, product: str) -> Mapping[str, int]:
        """Every product sharing at least one customer with `product`, with that pair support."""
        return self._pairs.get(product, {})

    def similarity(self, a: str, b: str, measure: SimilarityMeasure, min_support: int) -> float:
        n_ab = self.support(a, b)
        if n_ab < min_support or a == b:
            return 0.0
        n_a, n_b = self._customers_of[a], self._customers_of[b]
        if measure is SimilarityMeasure.LIFT:
            return n_ab * self.customer_total / (n_a * n_b)
        return n_ab / math.sqrt(n_a * n_b)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PairCounts):
            return NotImplemented
        return (
            self._products_of == other._products_of
            and self._customers_of == other._customers_of
            and self._pairs == other._pairs
        )

    __hash__ = None  # type: ignore[assignment]


class CooccurrenceCounts:
    """Co-purchase and co-view counts together: everything item-to-item scoring needs."""

    __slots__ = ("purchases", "views")

    def __init__(self, purchases: PairCounts | None = None, views: PairCounts | None = None) -> None:
        self.purchases = purchases or PairCounts()
        self.views = views or PairCounts()

    @classmethod
    def full_recompute(
        cls, purchases: Mapping[str, Iterable[str]], views: Mapping[str, Iterable[str]]
    ) -> CooccurrenceCounts:
        return cls(PairCounts.from_histories(purchases), PairCounts.from_histories(views))

    def add_purchase(self, customer: str, basket: Iterable[str]) -> BasketDelta:
        return self.purchases.add(customer, basket)

    def add_views(self, customer: str, products: Iterable[str]) -> BasketDelta:
        return self.views.add(customer, products)

    def remove_customer(self, customer: str) -> None:
        self.purchases.remove_customer(customer)
        self.views.remove_customer(customer)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CooccurrenceCounts):
            return NotImplemented
        return self.purchases == other.purchases and self.views == other.views

    __hash__ = None  # type: ignore[assignment]


class ItemScore(NamedTuple):
    """How strongly `product_id` goes with an anchor product, and the evidence behind it."""

    product_id: str
    score: float
    purchase_score: float
    view_score: float
    purchase_support: int  # customers who bought both
    view_support: int  # customers who viewed both


def item_score(counts: CooccurrenceCounts, anchor: str, product: str, params: ScoringParams) -> ItemScore:
    """score = sim_purchases(anchor, product) + view_weight * sim_views(anchor, product)."""
    purchase = counts.purchases.similarity(anchor, product, params.measure, params.min_support)
    view = counts.views.similarity(anchor, product, params.measure, params.min_support)
    return ItemScore(
        product_id=product,
        score=purchase + params.view_weight * view,
        purchase_score=purchase,
        view_score=view,
        purchase_support=counts.purchases.support(anchor, product),
        view_support=counts.views.support(anchor, product),
    )


def similar_items(
    counts: CooccurrenceCounts, anchor: str, params: ScoringParams, limit: int | None = None
) -> list[ItemScore]:
    """Products that go with `anchor`, best first; ties by purchase support, then product id."""
    candidates = set(counts.purchases.neighbours(anchor)) | set(counts.views.neighbours(anchor))
    scored = [item_score(counts, anchor, product, params) for product in candidates]
    ranked = sorted(
        (s for s in scored if s.score > 0),
        key=lambda s: (-s.score, -s.purchase_support, -s.view_support, s.product_id),
    )
    return ranked if limit is None else ranked[:limit]


class ItemSimilarities:
    """The item-to-item table: each anchor's top neighbours, computed on first use and kept.

    Build a fresh one after the counts change (the scoring is cheap next to the counting).
    """

    __slots__ = ("_cache", "counts", "neighbours_per_item", "params")

    def __init__(
        self, counts: CooccurrenceCounts, params: ScoringParams, neighbours_per_item: int = 50
    ) -> None:
        self.counts = counts
        self.params = params
        self.neighbours_per_item = neighbours_per_item
        self._cache: dict[str, list[ItemScore]] = {}

    def of(self, anchor: str) -> list[ItemScore]:
        found = self._cache.get(anchor)
        if found is None:
            found = similar_items(self.counts, anchor, self.params, self.neighbours_per_item)
            self._cache[anchor] = found
        return found
