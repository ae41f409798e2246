"""Phone numbers as CLM sends to them and compares them: E.164 (`+14155550100`).

Profiles hold numbers as clients wrote them (`(415) 555-0100`, `+1 415-555-0100`, `07700 900123`);
Twilio reports an inbound STOP's `From` in E.164, and sends an unformatted national number to the
country it guesses. So one form for all of them: a STOP from a number then suppresses marketing SMS
to it however the profile wrote it, and the provider is given exactly the number that was checked.
A number without its country code is read in `default_region` (`sms_default_region`); without one
it is refused, never guessed.
"""

from __future__ import annotations

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat, ValidationResult

# Regions with phone number metadata (ISO 3166-1 alpha-2, and `001` for non-geographic entities).
SUPPORTED_REGIONS: frozenset[str] = frozenset(phonenumbers.SUPPORTED_REGIONS)

_TOO_SHORT = "too short for its country"
_LENGTH_PROBLEMS = {
    ValidationResult.TOO_SHORT: _TOO_SHORT,
    ValidationResult.TOO_LONG: "too long for its country",
    ValidationResult.INVALID_LENGTH: "not a length its country uses",
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "a local number only (no area code)",
    ValidationResult.INVALID_COUNTRY_CODE: "an unknown country code",
}


class InvalidPhoneNumber(ValueError):
    """A value no SMS can be sent to; the message says why (never the number: it is personal)."""


def to_e164(value: str, default_region: str | None) -> str:
    """`value` in E.164, read in `default_region` when it has no country code (`+` or the region's
    international prefix, such as `00`). Raises `InvalidPhoneNumber`. Checks the length its country
    uses, not that the number is assigned: metadata lags new ranges, and test numbers (555-01xx)
    must pass."""
    try:
        number = phonenumbers.parse(value, default_region)
    except NumberParseException as exc:
        if exc.error_type == NumberParseException.INVALID_COUNTRY_CODE:
            if default_region is None and not value.strip().startswith("+"):
                raise InvalidPhoneNumber(
                    "the phone number has no country code (+...) and no default region is set "
                    "(CLM_SMS_DEFAULT_REGION)"
                ) from None
            raise InvalidPhoneNumber("the phone number has an unknown country code") from None
        if exc.error_type == NumberParseException.TOO_SHORT_NSN:
            raise InvalidPhoneNumber(f"the phone number is {_TOO_SHORT}") from None
        raise InvalidPhoneNumber("the value is not a phone number") from None
    possible = phonenumbers.is_possible_number_with_reason(number)
    if possible != ValidationResult.IS_POSSIBLE:
        raise InvalidPhoneNumber(f"the phone number is {_LENGTH_PROBLEMS.get(possible, 'not possible')}")
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


def normalized(value: str, default_region: str | None) -> str | None:
    """`to_e164`, or None for a value that is no phone number CLM can send to."""
    try:
        return to_e164(value, default_region)
    except InvalidPhoneNumber:
        return None
