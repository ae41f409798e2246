"""Offline hold-out evaluation of cross-sell recommendations against a best-sellers baseline.

Hide each customer's last order, learn co-purchase/co-view counts from everything else, recommend
5 products per customer and count how often the hidden order contains one of them (hit rate@5)
and what share of the 5 it contains (precision@5). The baseline is the honest one: global best
sellers, excluding what the customer already owns. Only products new to the customer count as
targets (owned products are never recommended, by design).

DATA: SYNTHETIC. No public retail basket data set (Instacart, Online Retail, Groceries...) ships
inside a package installable from PyPI here (checked: mlxtend ships only iris/wine/mnist-style
sets; `mba` and `market-basket-analysis` ship no data; others download at run time, which this
platform cannot). So baskets are generated with a known structure: categories, Zipf-like
popularity, complementary products (mostly across categories), per-customer category taste,
repeat customers coming back for complements, and noise. See docs/recommendations.md.

Run: `python -m bench.recommendations` (or `make bench-recommendations`).
Last line: `reco_hit_rate_ratio=<model hit rate@5 / best-sellers hit rate@5>`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from bench.report import last_line, line, percentile
from services.segmenter.domain.recommendations.catalogue import CatalogueItem
from services.segmenter.domain.recommendations.cooccurrence import (
    CooccurrenceCounts,
    ItemSimilarities,
    ScoringParams,
    SimilarityMeasure,
)
from services.segmenter.domain.recommendations.recommend import (
    CustomerHistory,
    PopularityIndex,
    RecommendParams,
    cross_sell,
)

SEED = 20261124
# The headline shop: 1,000 products (small next to a real shop; top-5 best sellers then cover less
# of the demand than in a 300-product toy, which the second, smaller scenario shows).
CATEGORIES = 40
PRODUCTS_PER_CATEGORY = 25
CUSTOMERS = 10_000
TOP_N = 5


@dataclass(frozen=True)
class SyntheticShop:
    catalogue: dict[str, CatalogueItem]
    orders: dict[str, list[list[str]]]  # per customer, in time order
    complements: dict[str, list[str]]


def generate_shop(
    seed: int = SEED,
    customers: int = CUSTOMERS,
    category_count: int = CATEGORIES,
    products_per_category: int = PRODUCTS_PER_CATEGORY,
) -> SyntheticShop:
    """Baskets with a known co-purchase structure (the generator's parameters are the ground truth).

    - 15 categories x 20 products; popularity Zipf-like (weight 1/rank) over a shuffled ranking.
    - Each category has two partner categories; each product has two complements drawn from them
      (popularity-weighted), e.g. camera -> memory card, bag.
    - A customer likes 1-2 categories and places 2-7 orders. An order's products are, each:
      45% a complement of something they bought earlier (from the 2nd order on), 25% from their
      categories, 30% anywhere (popularity-weighted noise); a product pulls one of its
      complements into the same basket 30% of the time.
    """
    rng = random.Random(seed)
    categories = [f"cat{c:02d}" for c in range(category_count)]
    products: list[str] = []
    catalogue: dict[str, CatalogueItem] = {}
    by_category: dict[str, list[str]] = {c: [] for c in categories}
    for c, category in enumerate(categories):
        base = 10 * (1 + c % 5)
        for p in range(products_per_category):
            product_id = f"{category}-p{p:02d}"
            products.append(product_id)
            by_category[category].append(product_id)
            catalogue[product_id] = CatalogueItem(
                product_id=product_id,
                name=f"Product {p} of {category}",
                category=category,
                price=Decimal(round(base * rng.lognormvariate(0, 0.5), 2)).quantize(Decimal("0.01")),
                tier=1 + p % 3,
            )
    ranking = products[:]
    rng.shuffle(ranking)
    popularity = {product: 1 / (rank + 1) for rank, product in enumerate(ranking)}

    def popular_choice(pool: Sequence[str]) -> str:
        return rng.choices(pool, weights=[popularity[p] for p in pool])[0]

    partners = {category: rng.sample([c for c in categories if c != category], 2) for category in categories}
    complements: dict[str, list[str]] = {}
    for product in products:
        own_category = catalogue[product].category
        assert own_category is not None
        chosen: list[str] = []
        while len(chosen) < 2:
            candidate = popular_choice(by_category[rng.choice(partners[own_category])])
            if candidate not in chosen:
                chosen.append(candidate)
        complements[product] = chosen

    orders: dict[str, list[list[str]]] = {}
    for n in range(customers):
        customer = f"cust{n:05d}"
        taste = rng.sample(categories, rng.choice([1, 2]))
        history: list[str] = []
        customer_orders: list[list[str]] = []
        for order_index in range(rng.randint(2, 7)):
            basket: list[str] = []
            for _ in range(rng.choice([1, 1, 2, 2, 3])):
                draw = rng.random()
                if order_index > 0 and draw < 0.45:
                    product = rng.choice(complements[rng.choice(history)])
                elif draw < 0.70:
                    product = popular_choice(by_category[rng.choice(taste)])
                else:
                    product = popular_choice(products)
                basket.append(product)
                if rng.random() < 0.30:
                    basket.append(rng.choice(complements[product]))
            basket = list(dict.fromkeys(basket))
            customer_orders.append(basket)
            history.extend(basket)
        orders[customer] = customer_orders
    return SyntheticShop(catalogue, orders, complements)


def generate_views(
    shop: SyntheticShop, orders: Mapping[str, list[list[str]]], seed: int
) -> dict[str, list[str]]:
    """Browsing around the given orders: the products bought plus 0-3 looked at beside them
    (half complements, half products of the same category). Only training orders are passed in,
    so no view reveals a hidden order."""
    rng = random.Random(seed)
    views: dict[str, list[str]] = {}
    by_category: dict[str, list[str]] = {}
    for product_id, item in shop.catalogue.items():
        assert item.category is not None
        by_category.setdefault(item.category, []).append(product_id)
    for customer, customer_orders in orders.items():
        seen: list[str] = []
        for basket in customer_orders:
            seen.extend(basket)
            for _ in range(rng.choice([0, 1, 1, 2, 3])):
                around = rng.choice(basket)
                if rng.random() < 0.5:
                    seen.append(rng.choice(shop.complements[around]))
                else:
                    category = shop.catalogue[around].category
                    assert category is not None
                    seen.append(rng.choice(by_category[category]))
        views[customer] = seen
    return views


@dataclass
class Scores:
    hits: int = 0
    relevant: int = 0
    evaluated: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.evaluated if self.evaluated else 0.0

    @property
    def precision(self) -> float:
        return self.relevant / (self.evaluated * TOP_N) if self.evaluated else 0.0


Recommender = Callable[[CustomerHistory], list[str]]


def evaluate(recommend: Recommender, cases: Sequence[tuple[CustomerHistory, set[str]]]) -> Scores:
    scores = Scores()
    for history, targets in cases:
        top = recommend(history)[:TOP_N]
        assert not set(top) & history.purchased, "an owned product was recommended"
        found = len(set(top) & targets)
        scores.evaluated += 1
        scores.hits += found > 0
        scores.relevant += found
    return scores


def complements_oracle(shop: SyntheticShop, popularity: PopularityIndex) -> Recommender:
    """A reference, not a competitor: knows the generator's true complements (which no model
    can), ranks them by how many owned products point at them, then fills with best sellers."""
    rank = {product: i for i, product in enumerate(popularity.best_sellers)}

    def recommend(history: CustomerHistory) -> list[str]:
        pointed: dict[str, int] = {}
        for product in history.purchased:
            for complement in shop.complements[product]:
                if complement not in history.purchased:
                    pointed[complement] = pointed.get(complement, 0) + 1
        ranked = sorted(pointed, key=lambda p: (-pointed[p], rank.get(p, len(rank)), p))
        fill = [p for p in popularity.best_sellers if p not in history.purchased and p not in pointed]
        return (ranked + fill)[:TOP_N]

    return recommend


def run_scenario(title: str, shop: SyntheticShop, all_variants: bool) -> float:
    """Prints the figures of one synthetic shop; returns the default model's hit-rate ratio."""
    print(f"--- {title}", flush=True)
    started = time.perf_counter()
    training_orders = {c: orders[:-1] for c, orders in shop.orders.items()}
    purchases = {c: [p for basket in orders for p in basket] for c, orders in training_orders.items()}
    views = generate_views(shop, training_orders, SEED + 1)
    order_count = sum(len(o) for o in shop.orders.values())
    line("customers", len(shop.orders))
    line("products", len(shop.catalogue))
    line("orders (all)", order_count)
    line("products per order (mean)", sum(len(b) for o in shop.orders.values() for b in o) / order_count)

    started = time.perf_counter()
    counts = CooccurrenceCounts.full_recompute(purchases, views)
    line("full recompute of counts (sparse X^T X)", (time.perf_counter() - started) * 1000, "ms")
    if all_variants:
        started = time.perf_counter()
        incremental = CooccurrenceCounts()
        updates = 0
        for customer, customer_orders in training_orders.items():
            for basket in customer_orders:
                incremental.add_purchase(customer, basket)
                updates += 1
        for customer, viewed in views.items():
            incremental.add_views(customer, viewed)
            updates += 1
        elapsed = time.perf_counter() - started
        line("incremental update, per basket", elapsed / updates * 1e6, "us")
        same = incremental == counts
        print(f"{'incremental counts == full recompute':<48} {'yes' if same else 'NO':>12}", flush=True)
        if not same:
            raise SystemExit("incremental counts differ from the full recompute")

    cases = []
    for customer, orders in shop.orders.items():
        owned = frozenset(purchases[customer])
        targets = set(orders[-1]) - owned
        if targets:
            cases.append((CustomerHistory(purchased=owned, viewed=frozenset(views[customer])), targets))
    line("customers evaluated (last order has a new product)", len(cases))

    catalogue = shop.catalogue
    popularity = PopularityIndex(counts, catalogue)

    def model(scoring: ScoringParams, params: RecommendParams | None = None) -> Recommender:
        similarities = ItemSimilarities(counts, scoring)
        chosen = params or RecommendParams(cross_sell_limit=TOP_N)

        def recommend(history: CustomerHistory) -> list[str]:
            return [r.product_id for r in cross_sell(history, similarities, catalogue, popularity, chosen)]

        return recommend

    def best_sellers(history: CustomerHistory) -> list[str]:
        return [p for p in popularity.best_sellers if p not in history.purchased][:TOP_N]

    baseline_name, model_name = (
        "best sellers (baseline, owned excluded)",
        "model: defaults (cosine, support 2)",
    )
    variants: list[tuple[str, Recommender]] = [
        (baseline_name, best_sellers),
        (model_name, model(ScoringParams())),
    ]
    if all_variants:
        variants += [
            ("model: lift instead of cosine", model(ScoringParams(measure=SimilarityMeasure.LIFT))),
            ("model: no co-view scores", model(ScoringParams(view_weight=0))),
            (
                "model: no viewed anchors",
                model(ScoringParams(), RecommendParams(cross_sell_limit=TOP_N, viewed_anchor_weight=0)),
            ),
            ("model: min support 5", model(ScoringParams(min_support=5))),
        ]
    variants.append(("reference: true complements (oracle)", complements_oracle(shop, popularity)))
    results: dict[str, Scores] = {}
    for name, recommend in variants:
        latencies: list[float] = []

        def timed(
            history: CustomerHistory, recommend: Recommender = recommend, latencies: list[float] = latencies
        ) -> list[str]:
            t0 = time.perf_counter()
            out = recommend(history)
            latencies.append((time.perf_counter() - t0) * 1e6)
            return out

        results[name] = scores = evaluate(timed, cases)
        print(
            f"{name:<40} hit@5 {scores.hit_rate:6.3f}  precision@5 {scores.precision:6.3f}  "
            f"p50 {percentile(latencies, 50):6.0f} us/customer",
            flush=True,
        )
    baseline, chosen = results[baseline_name], results[model_name]
    line("precision@5 ratio (model / best sellers)", chosen.precision / baseline.precision)
    hit_ratio = chosen.hit_rate / baseline.hit_rate
    line("hit rate@5 ratio (model / best sellers)", hit_ratio)
    return hit_ratio


def main() -> None:
    print("recommendations: offline hold-out (hide each customer's last order), top-5 cross-sell", flush=True)
    print(
        "data: SYNTHETIC baskets with a known co-purchase structure: no public retail basket data set "
        "ships in a PyPI package (see this module's docstring and docs/recommendations.md)",
        flush=True,
    )
    started = time.perf_counter()
    headline = run_scenario(
        f"synthetic shop: {CATEGORIES * PRODUCTS_PER_CATEGORY} products, {CUSTOMERS} customers (headline)",
        generate_shop(),
        all_variants=True,
    )
    run_scenario(
        "synthetic shop: 300 products, 5000 customers (sensitivity: small catalogue, stronger best sellers)",
        generate_shop(customers=5000, category_count=15, products_per_category=20),
        all_variants=False,
    )
    line("total run time", time.perf_counter() - started, "s")
    last_line("reco_hit_rate_ratio", headline)


if __name__ == "__main__":
    main()
