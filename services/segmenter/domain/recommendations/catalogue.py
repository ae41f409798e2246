"""The product catalogue: item model, extraction from e-commerce events, bulk-upsert request.

Field names follow Segment's e-commerce spec (`product_id`, `sku`, `name`, `category`, `price`,
`brand`, `url`, `image_url`), so catalogue items can be read straight from `Product Viewed`,
`Product Added` and `Order Completed` (`products[]`) properties.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

MAX_ITEMS_PER_UPSERT: Final = 1000
MAX_ID_LENGTH: Final = 128
MAX_TEXT_LENGTH: Final = 500
MAX_URL_LENGTH: Final = 2048
MAX_PRICE: Final = Decimal("1000000000")


def _http_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise PydanticCustomError(
            "http_url", "must be an absolute http:// or https:// URL, got '{value}'", {"value": value[:80]}
        )
    return value


ProductId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
HttpUrl = Annotated[str | None, Field(default=None, max_length=MAX_URL_LENGTH), AfterValidator(_http_url)]


class CatalogueItem(BaseModel):
    """One product. Only `product_id` is required: events often carry a partial description."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    product_id: ProductId
    sku: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH)
    name: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    category: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    price: Decimal | None = Field(default=None, ge=0, le=MAX_PRICE, allow_inf_nan=False)
    brand: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    url: HttpUrl = None
    image_url: HttpUrl = None
    # Higher tier = the more premium version within a category (e.g. basic=1, pro=2); drives upsell.
    tier: int | None = Field(default=None, ge=0, le=1000)

    @property
    def label(self) -> str:
        """How a reason string names the product."""
        return self.name or self.product_id

    def merged_with(self, newer: CatalogueItem) -> CatalogueItem:
        """This item updated by `newer`: fields `newer` leaves unset keep their current value.

        Events describe products partially (a `Product Viewed` may carry only id and price), so an
        update must never erase what an earlier event or the admin API told us.
        """
        if newer.product_id != self.product_id:
            raise ValueError(f"cannot merge {newer.product_id!r} into {self.product_id!r}")
        changes = {f: getattr(newer, f) for f in newer.model_fields_set if getattr(newer, f) is not None}
        return self.model_copy(update=changes)


class CatalogueUpsertRequest(BaseModel):
    """Body of the admin bulk upsert: up to MAX_ITEMS_PER_UPSERT items, each product at most once."""

    model_config = ConfigDict(extra="forbid")

    items: list[CatalogueItem] = Field(min_length=1, max_length=MAX_ITEMS_PER_UPSERT)

    @field_validator("items")
    @classmethod
    def _unique_product_ids(cls, items: list[CatalogueItem]) -> list[CatalogueItem]:
        first_seen: dict[str, int] = {}
        for index, item in enumerate(items):
            if item.product_id in first_seen:
                raise PydanticCustomError(
                    "duplicate_product_id",
                    "items[{index}].product_id '{product_id}' repeats items[{first}]; "
                    "send each product once per request",
                    {"index": index, "first": first_seen[item.product_id], "product_id": item.product_id},
                )
            first_seen[item.product_id] = index
        return items


# --------------------------------------------------------------------------- extraction from events


class InteractionKind(StrEnum):
    PURCHASE = "purchase"
    VIEW = "view"


# Which track events describe products, and what a customer's interaction with them means.
PRODUCT_EVENTS: Final[Mapping[str, InteractionKind]] = {
    "Product Viewed": InteractionKind.VIEW,
    "Product Added": InteractionKind.VIEW,  # interest, not ownership: carts get abandoned
    "Order Completed": InteractionKind.PURCHASE,
}

_CATALOGUE_FIELDS: Final = ("sku", "name", "category", "price", "brand", "url", "image_url", "tier")


class RejectedProduct(BaseModel):
    """A product description in an event that could not become a catalogue item, and why."""

    model_config = ConfigDict(frozen=True)

    index: int | None  # position in `products[]`, None for single-product events
    product_id: str | None
    errors: list[str]


class ExtractedProducts(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: InteractionKind | None = None
    items: list[CatalogueItem] = Field(default_factory=list)
    rejected: list[RejectedProduct] = Field(default_factory=list)

    @property
    def product_ids(self) -> list[str]:
        """Distinct product ids in event order: what the customer viewed or bought."""
        return list(dict.fromkeys(item.product_id for item in self.items))


def _raw_product_id(properties: Mapping[str, Any]) -> Any:
    # Segment's v1 e-commerce spec used `id`; v2 renamed it `product_id`. Accept both.
    raw = properties.get("product_id")
    return properties.get("id") if raw is None else raw


def _describe(errors: Sequence[Any]) -> list[str]:
    return [f"{'.'.join(str(p) for p in e['loc']) or 'product'}: {e['msg']}" for e in errors]


def catalogue_item_from_properties(properties: Mapping[str, Any]) -> CatalogueItem:
    """One product description (event properties or one `products[]` entry) as a catalogue item.

    Raises pydantic's ValidationError with field-level reasons. Properties outside the catalogue
    fields (quantity, coupon, position...) are ignored; ids given as numbers become strings.
    """
    raw_id = _raw_product_id(properties)
    numeric_id = isinstance(raw_id, int) and not isinstance(raw_id, bool)
    data: dict[str, Any] = {"product_id": str(raw_id) if numeric_id else raw_id}
    for field in _CATALOGUE_FIELDS:
        value = properties.get(field)
        if value is not None and value != "":
            data[field] = str(value) if field == "sku" and isinstance(value, int) else value
    return CatalogueItem.model_validate(data)


def catalogue_items_from_event(event_name: str | None, properties: Mapping[str, Any]) -> ExtractedProducts:
    """Catalogue items described by a track event; never raises on bad input.

    Invalid product descriptions are returned in `rejected` (the caller logs or counts them); the
    valid ones still count. Events that are not product events give an empty result.
    """
    kind = PRODUCT_EVENTS.get(event_name or "")
    if kind is None:
        return ExtractedProducts()
    if kind is InteractionKind.PURCHASE:
        products = properties.get("products", [])
        entries: list[tuple[int | None, Any]] = (
            list(enumerate(products)) if isinstance(products, list) else [(None, products)]
        )
    else:
        entries = [(None, properties)]
    items: list[CatalogueItem] = []
    rejected: list[RejectedProduct] = []
    for index, entry in entries:
        if not isinstance(entry, Mapping):
            rejected.append(
                RejectedProduct(index=index, product_id=None, errors=["product: must be an object"])
            )
            continue
        try:
            items.append(catalogue_item_from_properties(entry))
        except ValidationError as exc:
            raw_id = _raw_product_id(entry)
            rejected.append(
                RejectedProduct(
                    index=index,
                    product_id=str(raw_id)[:MAX_ID_LENGTH] if raw_id is not None else None,
                    errors=_describe(exc.errors()),
                )
            )
    return ExtractedProducts(kind=kind, items=items, rejected=rejected)
