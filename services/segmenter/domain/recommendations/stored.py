"""Counts read back from the store (pure): the slice of the co-occurrence tables one batch of
customers needs, as the `CooccurrenceCounts` the scoring functions take, and the count increments
a batch of new purchases/views causes (summed over the batch, ready for one upsert per table)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from services.segmenter.domain.recommendations.catalogue import InteractionKind
from services.segmenter.domain.recommendations.cooccurrence import (
    CooccurrenceCounts,
    PairCounts,
    basket_delta,
)


class StoredPairCounts(PairCounts):
    """A `PairCounts` holding only the rows loaded from the store: exact for the products and the
    anchors' pairs it was given, and N (`customer_total`) as counted by the store."""

    __slots__ = ("_total",)

    def __init__(
        self,
        customer_total: int,
        product_customers: Mapping[str, int],
        pairs: Iterable[tuple[str, str, int]],
    ) -> None:
        super().__init__()
        self._total = customer_total
        self._customers_of = {p: n for p, n in product_customers.items() if n > 0}
        for a, b, n in pairs:
            if n > 0 and a != b:
                self._pairs.setdefault(a, {})[b] = n
                self._pairs.setdefault(b, {})[a] = n

    @property
    def customer_total(self) -> int:
        return self._total


def stored_counts(
    totals: Mapping[InteractionKind, int],
    product_customers: Mapping[InteractionKind, Mapping[str, int]],
    pairs: Mapping[InteractionKind, Iterable[tuple[str, str, int]]],
) -> CooccurrenceCounts:
    def signal(kind: InteractionKind) -> StoredPairCounts:
        return StoredPairCounts(totals.get(kind, 0), product_customers.get(kind, {}), pairs.get(kind, ()))

    return CooccurrenceCounts(signal(InteractionKind.PURCHASE), signal(InteractionKind.VIEW))


@dataclass
class CountIncrements:
    """What a batch adds, per signal: new (customer, product) rows, +n per product, +n per pair
    (both directions, as the store keeps the adjacency symmetric)."""

    new_rows: list[tuple[str, InteractionKind, str]] = field(default_factory=list)
    products: Counter[tuple[InteractionKind, str]] = field(default_factory=Counter)
    pairs: Counter[tuple[InteractionKind, str, str]] = field(default_factory=Counter)
    customers: set[str] = field(default_factory=set)  # whose products changed


def batch_increments(
    owned: Mapping[tuple[str, InteractionKind], AbstractSet[str]],
    interactions: Iterable[tuple[str, InteractionKind, list[str]]],
) -> CountIncrements:
    """`basket_delta` applied event after event: `owned` is what each (customer, signal) already has
    in the store; each interaction is one event's products, in event order."""
    have = {key: set(products) for key, products in owned.items()}
    out = CountIncrements()
    for customer, kind, basket in interactions:
        current = have.setdefault((customer, kind), set())
        delta = basket_delta(current, basket)
        if not delta.new_products:
            continue
        out.customers.add(customer)
        for product in delta.new_products:
            out.new_rows.append((customer, kind, product))
            out.products[(kind, product)] += 1
        for a, b in delta.new_pairs:
            out.pairs[(kind, a, b)] += 1
            out.pairs[(kind, b, a)] += 1
        current.update(delta.new_products)
    return out
