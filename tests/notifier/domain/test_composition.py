"""Template variables from a request: data that cannot be merged is named, never a TypeError."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.notifier.domain.composition import (
    ContactView,
    InvalidTemplateData,
    contact_from_traits,
    template_data,
)
from services.notifier.domain.signing import LinkSigner, MessageLinks
from shared.contracts import MessageRequested

LINKS = MessageLinks(LinkSigner("s"), "https://n.example.com")


def _request(data: dict[str, Any]) -> MessageRequested:
    return MessageRequested(
        message_id="m-1",
        customer_id="c-1",
        channel="sms",
        template_id="t",
        data=data,
        journey_id="j",
        requested_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


@pytest.mark.parametrize("data", [{"traits": ["vip"]}, {"journey": "welcome"}, {"traits": "x"}])
def test_template_data_names_the_field_instead_of_a_type_error(data: dict[str, Any]) -> None:
    # `**data["traits"]` raised TypeError: the message failed as "internal error: TypeError".
    with pytest.raises(InvalidTemplateData, match=r"data\.(traits|journey) must be an object"):
        template_data(_request(data), ContactView("c-1", traits={"a": 1}), LINKS, "+4790000000")


def test_template_data_merges_objects_over_what_the_notifier_knows() -> None:
    data = template_data(
        _request({"traits": {"b": 2}, "journey": {"node_id": "n-9"}}),
        ContactView("c-1", traits={"a": 1, "b": 1}),
        LINKS,
        "+4790000000",
    )
    assert data["traits"] == {"a": 1, "b": 2}
    assert data["journey"] == {"id": "j", "version": None, "instance_id": None, "node_id": "n-9"}


def test_a_contact_keeps_its_emails_mailbox_and_none_for_what_is_no_address() -> None:
    """A spam complaint finds the customer by it; a 4 KB `email` trait (clients send anything) is
    kept as written but has no mailbox (an index entry for it failed the whole profile batch)."""
    assert contact_from_traits("c", {"email": "Ann <Ann@Example.com>"}).email_address == "ann@example.com"
    long = contact_from_traits("c", {"email": "x" * 4000 + "@example.com"})
    assert long.email is not None and long.email_address is None
    assert contact_from_traits("c", {"email": "call me"}).email_address is None
    assert contact_from_traits("c", {}).email_address is None
