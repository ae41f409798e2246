"""Numbers as SMS are sent to and STOPs matched by: E.164, read in the default region when they
have no country code, refused (with the reason, never the number) when they are no number."""

from __future__ import annotations

import pytest

from services.notifier.domain.consent import phone_key
from services.notifier.domain.phone_numbers import InvalidPhoneNumber, normalized, to_e164


@pytest.mark.parametrize(
    ("written", "region", "e164"),
    [
        # Twilio's `From`, and the same number as clients write it.
        ("+14155550100", None, "+14155550100"),
        ("+1 (415) 555-0100", None, "+14155550100"),
        ("  +1.415.555.0100 ", "GB", "+14155550100"),  # its own country code wins over the region
        # National forms, read in the region: with and without the trunk prefix.
        ("(415) 555-0100", "US", "+14155550100"),
        ("1-415-555-0100", "US", "+14155550100"),
        ("07700 900123", "GB", "+447700900123"),
        # The region's international prefix instead of `+`.
        ("0044 20 7946 0000", "GB", "+442079460000"),
        ("011 44 20 7946 0000", "US", "+442079460000"),
        # Test ranges (555-01xx) are not assigned numbers, but have their country's length.
        ("+1 555 010 0199", None, "+15550100199"),
        # An extension is not part of where an SMS goes.
        ("+1 415 555 0100 ext. 12", None, "+14155550100"),
    ],
)
def test_numbers_are_read_as_e164(written: str, region: str | None, e164: str) -> None:
    assert to_e164(written, region) == e164
    assert normalized(written, region) == e164


@pytest.mark.parametrize(
    ("written", "region", "reason"),
    [
        ("(415) 555-0100", None, "no country code (+...) and no default region is set"),
        ("+999 123 4567", None, "unknown country code"),
        ("+123", None, "too short"),
        ("12", "US", "too short"),
        ("555 0100", "US", "a local number only"),
        ("+1 415 555 0100 99999", None, "too long"),
        ("call me", "US", "not a phone number"),
        ("", "US", "not a phone number"),
    ],
)
def test_what_is_no_number_is_refused_with_the_reason(written: str, region: str | None, reason: str) -> None:
    with pytest.raises(InvalidPhoneNumber) as refused:
        to_e164(written, region)
    assert reason in str(refused.value)
    assert normalized(written, region) is None
    digits = "".join(c for c in written if c.isdigit())
    assert len(digits) < 4 or digits not in str(refused.value)  # the reason never repeats the number


def test_the_stop_key_of_every_form_of_a_number_is_one() -> None:
    forms = ["+14155550100", "+1 (415) 555-0100", "(415) 555-0100", "415.555.0100"]
    keys = {phone_key("salt", e164) for f in forms if (e164 := normalized(f, "US"))}
    assert len(keys) == 1

    # A key written before numbers were read as E.164 (by this rule, now gone) is the same for every
    # number written with its `+`, as Twilio's `From` always is.
    def before(value: str) -> str:
        digits = "".join(ch for ch in value.strip() if ch.isascii() and ch.isdigit())
        return ("+" if value.strip().startswith("+") else "") + digits

    for written in ("+14155550100", "+1 (415) 555-0100", " +1.415.555.0100"):
        assert phone_key("salt", before(written)) in keys
    assert phone_key("other salt", "+14155550100") not in keys
