from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from services.segmenter.domain.recommendations.catalogue import (
    MAX_ITEMS_PER_UPSERT,
    CatalogueItem,
    CatalogueUpsertRequest,
    InteractionKind,
    catalogue_items_from_event,
)


def errors_of(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    with pytest.raises(ValidationError) as caught:
        CatalogueItem.model_validate(data)
    return [(".".join(str(p) for p in e["loc"]), e["type"], e["msg"]) for e in caught.value.errors()]


def test_a_full_item_validates_and_normalizes() -> None:
    item = CatalogueItem.model_validate(
        {
            "product_id": " p-1 ",
            "sku": "SKU-1",
            "name": "Trail shoe",
            "category": "Shoes",
            "price": "89.90",
            "brand": "Acme",
            "url": "https://shop.example/p-1",
            "image_url": "http://cdn.example/p-1.jpg",
            "tier": 2,
        }
    )
    assert item.product_id == "p-1"
    assert item.price == Decimal("89.90")
    assert item.label == "Trail shoe"
    assert CatalogueItem(product_id="p-2").label == "p-2"


@pytest.mark.parametrize(
    ("data", "field", "rule"),
    [
        ({"product_id": "p", "price": -1}, "price", "greater_than_equal"),
        ({"product_id": "p", "price": "NaN"}, "price", "finite_number"),
        ({"product_id": "p", "url": "ftp://files.example/p"}, "url", "http_url"),
        ({"product_id": "p", "image_url": "/relative/p.jpg"}, "image_url", "http_url"),
        ({"product_id": "p", "url": "https://x/" + "a" * 2100}, "url", "string_too_long"),
        ({"product_id": ""}, "product_id", "string_too_short"),
        ({"product_id": "   "}, "product_id", "string_too_short"),
        ({"product_id": "p" * 129}, "product_id", "string_too_long"),
        ({"name": "no id"}, "product_id", "missing"),
        ({"product_id": "p", "sku": ""}, "sku", "string_too_short"),
        ({"product_id": "p", "name": "n" * 501}, "name", "string_too_long"),
        ({"product_id": "p", "tier": -1}, "tier", "greater_than_equal"),
        ({"product_id": "p", "colour": "red"}, "colour", "extra_forbidden"),
    ],
)
def test_bad_items_name_the_field_and_the_rule(data: dict[str, Any], field: str, rule: str) -> None:
    errors = errors_of(data)
    assert [(f, r) for f, r, _ in errors] == [(field, rule)]
    assert errors[0][2]  # a human-readable message


def test_url_error_message_says_what_is_expected() -> None:
    [(_, _, message)] = errors_of({"product_id": "p", "url": "javascript:alert(1)"})
    assert "http:// or https://" in message


def test_bulk_upsert_rejects_a_duplicate_product_id_naming_both_indexes() -> None:
    with pytest.raises(ValidationError) as caught:
        CatalogueUpsertRequest.model_validate(
            {"items": [{"product_id": "a"}, {"product_id": "b"}, {"product_id": "a", "price": 3}]}
        )
    [error] = caught.value.errors()
    assert error["loc"] == ("items",)
    assert error["type"] == "duplicate_product_id"
    assert "items[2]" in error["msg"] and "items[0]" in error["msg"] and "'a'" in error["msg"]
    assert error["ctx"] == {"index": 2, "first": 0, "product_id": "a"}


def test_bulk_upsert_limits_the_item_count_and_locates_bad_items() -> None:
    CatalogueUpsertRequest.model_validate(
        {"items": [{"product_id": str(i)} for i in range(MAX_ITEMS_PER_UPSERT)]}
    )
    with pytest.raises(ValidationError) as too_many:
        CatalogueUpsertRequest.model_validate(
            {"items": [{"product_id": str(i)} for i in range(MAX_ITEMS_PER_UPSERT + 1)]}
        )
    assert [e["type"] for e in too_many.value.errors()] == ["too_long"]
    with pytest.raises(ValidationError) as empty:
        CatalogueUpsertRequest.model_validate({"items": []})
    assert [e["type"] for e in empty.value.errors()] == ["too_short"]
    with pytest.raises(ValidationError) as bad_price:
        CatalogueUpsertRequest.model_validate(
            {"items": [{"product_id": "a"}, {"product_id": "b", "price": -5}]}
        )
    assert [(e["loc"], e["type"]) for e in bad_price.value.errors()] == [
        (("items", 1, "price"), "greater_than_equal")
    ]


def test_merge_keeps_fields_the_update_does_not_set() -> None:
    known = CatalogueItem(product_id="p", name="Shoe", category="Shoes", price=Decimal("50"))
    update = CatalogueItem.model_validate({"product_id": "p", "price": "45", "name": None})
    merged = known.merged_with(update)
    assert merged == CatalogueItem(product_id="p", name="Shoe", category="Shoes", price=Decimal("45"))
    with pytest.raises(ValueError, match="cannot merge"):
        known.merged_with(CatalogueItem(product_id="other"))


def test_product_viewed_properties_become_one_item_ignoring_other_properties() -> None:
    extracted = catalogue_items_from_event(
        "Product Viewed",
        {
            "product_id": "507f1f77bcf86cd799439011",
            "sku": "G-32",
            "category": "Games",
            "name": "Monopoly: 3rd Edition",
            "brand": "Hasbro",
            "variant": "200 pieces",
            "price": 18.99,
            "quantity": 1,
            "coupon": "MAYDEALS",
            "currency": "usd",
            "position": 3,
            "value": 18.99,
            "url": "https://www.example.com/product/path",
            "image_url": "https://www.example.com/product/path.jpg",
        },
    )
    assert extracted.kind is InteractionKind.VIEW
    assert extracted.rejected == []
    [item] = extracted.items
    assert item == CatalogueItem(
        product_id="507f1f77bcf86cd799439011",
        sku="G-32",
        category="Games",
        name="Monopoly: 3rd Edition",
        brand="Hasbro",
        price=Decimal("18.99"),
        url="https://www.example.com/product/path",
        image_url="https://www.example.com/product/path.jpg",
    )


def test_product_added_counts_as_interest_and_accepts_the_v1_id_field() -> None:
    extracted = catalogue_items_from_event("Product Added", {"id": 42, "sku": 1001, "price": "3.50"})
    assert extracted.kind is InteractionKind.VIEW
    assert extracted.items == [CatalogueItem(product_id="42", sku="1001", price=Decimal("3.50"))]


def test_order_completed_products_keep_the_good_and_report_the_bad_by_index() -> None:
    extracted = catalogue_items_from_event(
        "Order Completed",
        {
            "order_id": "o-1",
            "total": 30,
            "products": [
                {"product_id": "a", "name": "A", "price": 10, "quantity": 2, "category": "X"},
                {"product_id": "b", "price": -1},
                "not an object",
                {"name": "no id"},
                {"product_id": "a", "quantity": 1},
                {"product_id": "c", "url": "mailto:x@example.com"},
            ],
        },
    )
    assert extracted.kind is InteractionKind.PURCHASE
    assert [i.product_id for i in extracted.items] == ["a", "a"]
    assert extracted.product_ids == ["a"]
    assert [(r.index, r.product_id) for r in extracted.rejected] == [(1, "b"), (2, None), (3, None), (5, "c")]
    assert extracted.rejected[0].errors == ["price: Input should be greater than or equal to 0"]
    assert extracted.rejected[2].errors[0].startswith("product_id:")


@pytest.mark.parametrize(
    ("event", "properties"),
    [
        ("Signed Up", {"product_id": "a"}),
        (None, {"product_id": "a"}),
        ("Order Completed", {"order_id": "o"}),
        ("Order Completed", {"products": "a,b"}),
        ("Product Viewed", {}),
    ],
)
def test_extraction_never_raises_on_odd_events(event: str | None, properties: dict[str, Any]) -> None:
    extracted = catalogue_items_from_event(event, properties)
    assert extracted.items == []
    if event in ("Signed Up", None):
        assert extracted.kind is None
    expected_rejections = 1 if properties in ({"products": "a,b"}, {}) else 0
    assert len(extracted.rejected) == expected_rejections
