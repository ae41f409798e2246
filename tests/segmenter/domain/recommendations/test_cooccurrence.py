import math
import random

import pytest

from services.segmenter.domain.recommendations.cooccurrence import (
    BasketDelta,
    CooccurrenceCounts,
    ItemSimilarities,
    PairCounts,
    ScoringParams,
    SimilarityMeasure,
    basket_delta,
    item_score,
    similar_items,
)

# Five customers (N = 5). Buyers: A=4, B=3, C=2, D=1. Pairs (customers): AB=2, AC=2, BC=1, AD=1.
BASKETS = {
    "c1": ["A", "B"],
    "c2": ["A", "B", "C"],
    "c3": ["A", "C"],
    "c4": ["B"],
    "c5": ["D", "A"],
}
COSINE = SimilarityMeasure.COSINE
LIFT = SimilarityMeasure.LIFT


def hand_built() -> PairCounts:
    counts = PairCounts()
    for customer, basket in BASKETS.items():
        counts.add(customer, basket)
    return counts


def test_counts_are_per_customer() -> None:
    counts = hand_built()
    assert counts.customer_total == 5
    assert {p: counts.customers_of(p) for p in "ABCD"} == {"A": 4, "B": 3, "C": 2, "D": 1}
    assert (counts.support("A", "B"), counts.support("B", "A")) == (2, 2)
    assert (counts.support("A", "C"), counts.support("B", "C"), counts.support("A", "D")) == (2, 1, 1)
    assert counts.support("C", "D") == 0
    # Buying A and B again does not count c1 twice.
    counts.add("c1", ["A", "B"])
    assert (counts.customers_of("A"), counts.support("A", "B")) == (4, 2)


def test_cosine_by_hand() -> None:
    counts = hand_built()
    assert counts.similarity("A", "B", COSINE, min_support=2) == pytest.approx(2 / math.sqrt(4 * 3))
    assert counts.similarity("A", "C", COSINE, min_support=2) == pytest.approx(2 / math.sqrt(4 * 2))
    assert counts.similarity("B", "C", COSINE, min_support=1) == pytest.approx(1 / math.sqrt(3 * 2))
    assert counts.similarity("A", "D", COSINE, min_support=1) == pytest.approx(0.5)
    assert counts.similarity("A", "B", COSINE, 2) == counts.similarity("B", "A", COSINE, 2)


def test_lift_by_hand() -> None:
    counts = hand_built()
    assert counts.similarity("A", "B", LIFT, min_support=2) == pytest.approx(2 * 5 / (4 * 3))
    assert counts.similarity("A", "C", LIFT, min_support=2) == pytest.approx(2 * 5 / (4 * 2))
    assert counts.similarity("A", "D", LIFT, min_support=1) == pytest.approx(1 * 5 / (4 * 1))


def test_pairs_below_min_support_do_not_count() -> None:
    counts = CooccurrenceCounts(purchases=hand_built())
    assert counts.purchases.similarity("B", "C", COSINE, min_support=2) == 0.0
    assert counts.purchases.similarity("A", "D", LIFT, min_support=2) == 0.0
    strict = ScoringParams(min_support=2)
    assert [s.product_id for s in similar_items(counts, "A", strict)] == ["C", "B"]
    assert [s.product_id for s in similar_items(counts, "B", strict)] == ["A"]
    assert similar_items(counts, "D", strict) == []
    loose = ScoringParams(min_support=1)
    assert [s.product_id for s in similar_items(counts, "A", loose)] == ["C", "B", "D"]
    assert [s.product_id for s in similar_items(counts, "D", loose)] == ["A"]


def test_a_product_everyone_buys_does_not_crowd_out_a_true_complement() -> None:
    counts = PairCounts()
    for i in range(20):
        counts.add(f"c{i}", ["popular"])
    for i in range(4):  # four of them also bought the camera, three of those the memory card
        counts.add(f"c{i}", ["camera"])
    for i in range(3):
        counts.add(f"c{i}", ["memory card"])
    # Raw co-counts would put the popular product first (4 customers vs 3).
    assert counts.support("camera", "popular") > counts.support("camera", "memory card")
    cooc = CooccurrenceCounts(purchases=counts)
    for measure in SimilarityMeasure:
        ranked = similar_items(cooc, "camera", ScoringParams(measure=measure, min_support=2))
        assert ranked[0].product_id == "memory card", measure
    cosine = similar_items(cooc, "camera", ScoringParams())
    assert [(s.product_id, round(s.score, 4)) for s in cosine] == [
        ("memory card", round(3 / math.sqrt(4 * 3), 4)),
        ("popular", round(4 / math.sqrt(4 * 20), 4)),
    ]


def test_co_views_add_a_weighted_score_and_their_own_evidence() -> None:
    views = PairCounts()
    for customer in ("v1", "v2", "v3"):
        views.add(customer, ["A", "E"])
    views.add("v4", ["A"])
    counts = CooccurrenceCounts(purchases=hand_built(), views=views)
    params = ScoringParams(view_weight=0.3, min_support=2)
    view_cosine = 3 / math.sqrt(4 * 3)
    scored = item_score(counts, "A", "E", params)
    assert scored.purchase_score == 0.0 and scored.purchase_support == 0
    assert scored.view_score == pytest.approx(view_cosine)
    assert scored.score == pytest.approx(0.3 * view_cosine)
    assert scored.view_support == 3
    # A -> C: co-purchase 2/sqrt(8) = 0.707 beats co-view-only E: 0.3 * 0.866 = 0.26.
    assert [s.product_id for s in similar_items(counts, "A", params)] == ["C", "B", "E"]
    assert [
        s.product_id for s in similar_items(counts, "A", params.model_copy(update={"view_weight": 0}))
    ] == [
        "C",
        "B",
    ]


def test_ties_break_on_support_then_product_id() -> None:
    counts = PairCounts()
    for i in range(3):
        counts.add(f"c{i}", ["anchor", "y", "x"])
    ranked = similar_items(CooccurrenceCounts(purchases=counts), "anchor", ScoringParams())
    assert [s.product_id for s in ranked] == ["x", "y"]
    assert ranked[0].score == ranked[1].score


def test_basket_delta_touches_only_pairs_with_new_products() -> None:
    delta = basket_delta({"A", "B"}, ["C", "B", "D", "C"])
    assert delta.new_products == ["C", "D"]
    assert sorted(delta.new_pairs) == [("A", "C"), ("A", "D"), ("B", "C"), ("B", "D"), ("C", "D")]
    assert basket_delta({"A"}, ["A"]) == BasketDelta([], [])


def random_histories(seed: int) -> list[tuple[str, str, list[str]]]:
    """(signal, customer, basket) events in arrival order: several baskets per customer."""
    rng = random.Random(seed)
    products = [f"p{i:02d}" for i in range(40)]
    weights = [1 / (i + 1) for i in range(len(products))]  # Zipf-like popularity
    events = []
    for _ in range(600):
        signal = rng.choice(["purchase", "purchase", "view"])
        customer = f"c{rng.randrange(120)}"
        basket = rng.choices(products, weights, k=rng.randint(1, 5))
        events.append((signal, customer, basket))
    return events


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_incremental_updates_equal_a_full_recompute(seed: int) -> None:
    events = random_histories(seed)
    incremental = CooccurrenceCounts()
    purchases: dict[str, list[str]] = {}
    views: dict[str, list[str]] = {}
    for signal, customer, basket in events:
        if signal == "purchase":
            incremental.add_purchase(customer, basket)
            purchases.setdefault(customer, []).extend(basket)
        else:
            incremental.add_views(customer, basket)
            views.setdefault(customer, []).extend(basket)
    full = CooccurrenceCounts.full_recompute(purchases, views)
    assert incremental == full
    assert incremental.purchases.customer_total == len(purchases)
    for params in (ScoringParams(), ScoringParams(measure=LIFT, min_support=3, view_weight=0.5)):
        for product in {p for basket in purchases.values() for p in basket}:
            assert similar_items(incremental, product, params) == similar_items(full, product, params)


def test_removing_a_customer_equals_never_having_seen_them() -> None:
    events = random_histories(4)
    purchases: dict[str, list[str]] = {}
    for signal, customer, basket in events:
        if signal == "purchase":
            purchases.setdefault(customer, []).extend(basket)
    counts = PairCounts.from_histories(purchases)
    gone = sorted(purchases)[0]
    counts.remove_customer(gone)
    del purchases[gone]
    assert counts == PairCounts.from_histories(purchases)


def test_empty_histories_count_nobody() -> None:
    counts = PairCounts.from_histories({"c1": [], "c2": ["A"]})
    assert counts.customer_total == 1
    assert PairCounts.from_histories({}) == PairCounts()
    incremental = PairCounts()
    incremental.add("c1", [])
    assert incremental.customer_total == 0


def test_similarity_table_caches_the_top_neighbours() -> None:
    counts = CooccurrenceCounts(purchases=hand_built())
    table = ItemSimilarities(counts, ScoringParams(min_support=1), neighbours_per_item=2)
    assert [s.product_id for s in table.of("A")] == ["C", "B"]
    assert table.of("A") is table.of("A")
    assert table.of("unknown") == []
