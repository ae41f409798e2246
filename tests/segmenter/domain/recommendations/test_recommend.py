import math
import random
from decimal import Decimal

import pytest
from liquid import parse

from services.segmenter.domain.recommendations.catalogue import CatalogueItem
from services.segmenter.domain.recommendations.cooccurrence import (
    CooccurrenceCounts,
    ItemSimilarities,
    ScoringParams,
)
from services.segmenter.domain.recommendations.recommend import (
    CustomerHistory,
    PopularityIndex,
    Recommendation,
    RecommendationSource,
    RecommendParams,
    cross_sell,
    customer_categories,
    recommend_for_customer,
    upsell,
)

Source = RecommendationSource


def item(
    product_id: str, name: str, category: str | None, price: str | None, tier: int | None = None
) -> CatalogueItem:
    return CatalogueItem(
        product_id=product_id,
        name=name,
        category=category,
        price=Decimal(price) if price is not None else None,
        tier=tier,
    )


CATALOGUE = {
    i.product_id: i
    for i in [
        item("cam", "Camera", "Cameras", "300", tier=1),
        item("cam-pro", "Camera Pro", "Cameras", "600", tier=2),
        item("cam-max", "Camera Max", "Cameras", "1500", tier=3),
        item("card", "Memory card", "Accessories", "20"),
        item("bag", "Camera bag", "Accessories", "40"),
        item("tripod", "Tripod", "Accessories", "60"),
        item("book", "Photo book", "Books", "15"),
        item("lens", "Lens 50mm", "Lenses", "200"),
        item("lens-2", "Lens 35mm", "Lenses", "350"),
        item("lens-3", "Lens 85mm", "Lenses", "900"),
        item("lens-cap", "Lens cap", "Lenses", None),
    ]
}

# Buyers: cam 4, card 4, book 4, bag 2, tripod 2. Pairs: cam-card 3, cam-bag 2, everything else 1.
PURCHASES = {
    "u1": ["cam", "card", "bag"],
    "u2": ["cam", "card"],
    "u3": ["cam", "card", "tripod"],
    "u4": ["cam", "bag"],
    "u5": ["book"],
    "u6": ["book", "card"],
    "u7": ["book"],
    "u8": ["book", "tripod"],
}
# Two customers looked at the 50mm lens and the tripod together.
VIEWS = {"w1": ["lens", "tripod"], "w2": ["lens", "tripod"], "w3": ["lens"]}


def setup(
    params: ScoringParams | None = None,
    purchases: dict[str, list[str]] | None = None,
    views: dict[str, list[str]] | None = None,
) -> tuple[ItemSimilarities, PopularityIndex]:
    counts = CooccurrenceCounts.full_recompute(
        PURCHASES if purchases is None else purchases, VIEWS if views is None else views
    )
    return ItemSimilarities(counts, params or ScoringParams()), PopularityIndex(counts, CATALOGUE)


def history(purchased: tuple[str, ...] = (), viewed: tuple[str, ...] = ()) -> CustomerHistory:
    return CustomerHistory(purchased=frozenset(purchased), viewed=frozenset(viewed))


def summary(recommendations: list[Recommendation]) -> list[tuple[str, Source]]:
    return [(r.product_id, r.source) for r in recommendations]


def test_cross_sell_from_co_purchases_with_reason_then_cold_start_fill() -> None:
    similarities, popularity = setup()
    recs = cross_sell(history(("cam", "card")), similarities, CATALOGUE, popularity, RecommendParams())
    assert summary(recs) == [
        ("bag", Source.CO_PURCHASE),  # cam-bag: 2 customers; card-bag and the tripod pairs: 1 (< min support)
        ("tripod", Source.CATEGORY_BEST_SELLER),  # Accessories sorts before Cameras (one product each)
        ("book", Source.BEST_SELLER),
    ]
    bag = recs[0]
    assert bag.reason == "bought with Camera by 2 customers"
    assert bag.anchor_product_id == "cam" and bag.support == 2
    assert bag.score == pytest.approx(2 / math.sqrt(4 * 2))
    assert bag.item == CATALOGUE["bag"]
    assert recs[1].reason == "best seller in Accessories: bought by 2 customers"
    assert recs[2].reason == "best seller: bought by 4 customers"


def test_owned_products_are_never_recommended() -> None:
    similarities, popularity = setup(ScoringParams(min_support=1))
    rng = random.Random(7)
    products = sorted({p for basket in PURCHASES.values() for p in basket})
    for _ in range(50):
        owned = tuple(rng.sample(products, rng.randint(0, len(products))))
        viewed = tuple(rng.sample(sorted(CATALOGUE), 2))
        recs = recommend_for_customer(
            history(owned, viewed), similarities, CATALOGUE, popularity, RecommendParams()
        )
        offered = [r.product_id for r in recs.cross_sell + recs.upsell]
        assert not set(offered) & set(owned)
        assert len({r.product_id for r in recs.cross_sell}) == len(recs.cross_sell)


def test_min_support_decides_what_counts_as_bought_together() -> None:
    strict, popularity = setup(ScoringParams(min_support=2))
    loose, _ = setup(ScoringParams(min_support=1))
    customer = history(("book",))
    # book-card and book-tripod were each bought by one customer.
    assert [r.source for r in cross_sell(customer, strict, CATALOGUE, popularity, RecommendParams())] == [
        Source.BEST_SELLER
    ] * 4
    recs = cross_sell(customer, loose, CATALOGUE, popularity, RecommendParams(cross_sell_limit=2))
    assert summary(recs) == [("tripod", Source.CO_PURCHASE), ("card", Source.CO_PURCHASE)]
    assert recs[0].reason == "bought with Photo book by 1 customer"


def test_cold_start_without_history_is_best_sellers_with_ties_by_id() -> None:
    similarities, popularity = setup()
    recs = cross_sell(history(), similarities, CATALOGUE, popularity, RecommendParams())
    assert summary(recs) == [
        ("book", Source.BEST_SELLER),
        ("cam", Source.BEST_SELLER),
        ("card", Source.BEST_SELLER),
        ("bag", Source.BEST_SELLER),
        ("tripod", Source.BEST_SELLER),
    ]
    assert [r.support for r in recs] == [4, 4, 4, 2, 2]
    assert cross_sell(history(), similarities, CATALOGUE, popularity, RecommendParams(cold_start=False)) == []


def test_cold_start_prefers_the_customers_categories_then_overall() -> None:
    similarities, popularity = setup(views={})
    customer = history(viewed=("tripod", "book"))
    assert customer_categories(customer, CATALOGUE) == ["Accessories", "Books"]
    recs = cross_sell(customer, similarities, CATALOGUE, popularity, RecommendParams(cross_sell_limit=6))
    # tripod-book: one customer (< min support), so all fill: Accessories, then Books, then overall.
    assert summary(recs) == [
        ("card", Source.CATEGORY_BEST_SELLER),
        ("bag", Source.CATEGORY_BEST_SELLER),
        ("tripod", Source.CATEGORY_BEST_SELLER),
        ("book", Source.CATEGORY_BEST_SELLER),
        ("cam", Source.BEST_SELLER),
    ]
    bought_books = history(purchased=("book",), viewed=("bag", "tripod"))
    assert customer_categories(bought_books, CATALOGUE) == ["Books", "Accessories"]


def test_a_viewed_product_leads_to_its_co_viewed_products_with_a_view_reason() -> None:
    similarities, popularity = setup()
    recs = cross_sell(history(viewed=("lens",)), similarities, CATALOGUE, popularity, RecommendParams())
    first = recs[0]
    assert (first.product_id, first.source) == ("tripod", Source.CO_VIEW)
    assert first.reason == "viewed with Lens 50mm by 2 customers"
    # viewed anchor weight 0.5 x view weight 0.3 x cosine 2 / sqrt(3 * 2)
    assert first.score == pytest.approx(0.5 * 0.3 * 2 / math.sqrt(6))
    weightless = RecommendParams(viewed_anchor_weight=0)
    assert cross_sell(history(viewed=("lens",)), similarities, CATALOGUE, popularity, weightless)[
        0
    ].source in (
        Source.CATEGORY_BEST_SELLER,
        Source.BEST_SELLER,
    )


def test_scores_add_up_over_anchors_and_ties_break_by_product_id() -> None:
    purchases = {f"u{i}": ["a", "b", "x", "y"] for i in range(3)} | {"u9": ["c", "x"], "u10": ["c", "x"]}
    similarities, popularity = setup(purchases=purchases, views={})
    recs = cross_sell(
        history(("a", "b")), similarities, CATALOGUE, popularity, RecommendParams(cold_start=False)
    )
    assert [r.product_id for r in recs] == ["y", "x"]  # x is also bought by c-buyers: lower cosine
    one_anchor = 3 / math.sqrt(3 * 3)
    assert recs[0].score == pytest.approx(2 * one_anchor)
    same = cross_sell(history(("a",)), similarities, CATALOGUE, popularity, RecommendParams(cold_start=False))
    assert [r.product_id for r in same][:1] == ["b"]  # b and y tie at 1.0: b < y
    assert same[1].product_id == "y" and same[0].score == same[1].score


def test_upsell_by_tier_skips_steps_already_taken() -> None:
    _, popularity = setup()
    recs = upsell(history(("cam",)), CATALOGUE, popularity, RecommendParams())
    assert [r.product_id for r in recs] == ["cam-pro", "cam-max"]  # no buyers: smallest step up first
    assert recs[0].reason == "upgrade from Camera: higher tier (2 vs 1) in Cameras"
    assert recs[0].source is Source.UPSELL and recs[0].anchor_product_id == "cam"
    # Owning the Pro makes it the anchor; the basic camera is never an "upgrade".
    recs = upsell(history(("cam", "cam-pro")), CATALOGUE, popularity, RecommendParams())
    assert [(r.product_id, r.anchor_product_id) for r in recs] == [("cam-max", "cam-pro")]
    # Tier upgrades (same line, better) rank before price-only ones, whatever their buyers.
    recs = upsell(history(("cam", "card")), CATALOGUE, popularity, RecommendParams())
    assert [(r.product_id, r.support) for r in recs] == [
        ("cam-pro", 0),
        ("cam-max", 0),
        ("bag", 2),
        ("tripod", 2),
    ]
    assert recs[2].reason == "upgrade from Memory card: higher price (40 vs 20) in Accessories"


def test_upsell_by_price_is_capped_and_stays_in_the_category() -> None:
    _, popularity = setup()
    recs = upsell(history(("lens",)), CATALOGUE, popularity, RecommendParams())
    # lens-3 (900) is more than 3x the 50mm (200); the lens cap has no price.
    assert [r.product_id for r in recs] == ["lens-2"]
    assert recs[0].reason == "upgrade from Lens 50mm: higher price (350 vs 200) in Lenses"
    uncapped = upsell(history(("lens",)), CATALOGUE, popularity, RecommendParams(upsell_max_price_ratio=None))
    assert [r.product_id for r in uncapped] == ["lens-2", "lens-3"]
    # Nothing in Books costs more than the book.
    assert upsell(history(("book",)), CATALOGUE, popularity, RecommendParams()) == []
    # Unknown products and products without a category give nothing to upgrade.
    assert upsell(history(("not-in-catalogue",)), CATALOGUE, popularity, RecommendParams()) == []


def test_upsell_from_viewed_products_and_ranked_by_buyers() -> None:
    purchases = {"u1": ["lens-3"], "u2": ["lens-3"], "u3": ["lens-2"]}
    _, popularity = setup(purchases=purchases, views={})
    recs = upsell(history(viewed=("lens",)), CATALOGUE, popularity, RecommendParams(upsell_max_price_ratio=5))
    assert [(r.product_id, r.support) for r in recs] == [("lens-3", 2), ("lens-2", 1)]
    # A bought product in the category anchors, not a viewed one.
    recs = upsell(history(("lens-2",), ("lens",)), CATALOGUE, popularity, RecommendParams())
    assert [(r.product_id, r.anchor_product_id) for r in recs] == [("lens-3", "lens-2")]


def test_recommendations_are_deterministic_whatever_the_input_order() -> None:
    similarities, popularity = setup(ScoringParams(min_support=1))
    shuffled = dict(reversed(list(PURCHASES.items())))
    other, other_popularity = setup(ScoringParams(min_support=1), purchases=shuffled)
    customer = history(("card", "book"), ("lens",))
    first = recommend_for_customer(customer, similarities, CATALOGUE, popularity, RecommendParams())
    second = recommend_for_customer(customer, other, CATALOGUE, other_popularity, RecommendParams())
    assert first == second
    assert first.cross_sell and first.upsell


def test_template_variables_render_in_liquid() -> None:
    similarities, popularity = setup()
    recs = recommend_for_customer(
        history(("cam", "card")), similarities, CATALOGUE, popularity, RecommendParams()
    )
    variables = recs.as_template_variables()
    assert variables["cross_sell"][0] == {
        "product_id": "bag",
        "sku": None,
        "name": "Camera bag",
        "category": "Accessories",
        "price": "40",
        "brand": None,
        "url": None,
        "image_url": None,
        "tier": None,
        "reason": "bought with Camera by 2 customers",
        "source": "co_purchase",
        "score": pytest.approx(2 / math.sqrt(8)),
    }
    template = parse(
        "{% for p in recommendations.cross_sell limit: 2 %}{{ p.name }} at {{ p.price }} ({{ p.reason }}); "
        "{% endfor %}{% for p in recommendations.upsell limit: 1 %}Upgrade: {{ p.name }}{% endfor %}"
    )
    assert template.render(recommendations=variables) == (
        "Camera bag at 40 (bought with Camera by 2 customers); "
        "Tripod at 60 (best seller in Accessories: bought by 2 customers); "
        "Upgrade: Camera Pro"
    )
