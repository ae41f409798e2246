"""`mailbox`: the one form of an email address, and none for text no mail system delivers to."""

from __future__ import annotations

import pytest
from aiosmtplib.email import parse_address

from services.notifier.domain.email_addresses import (
    DOMAIN_WITHOUT_IDNA,
    LOCAL_PART_BEYOND_ASCII,
    NoAsciiForm,
    ascii_mailbox,
    canonical_domain,
    mailbox,
    mailboxes,
)


@pytest.mark.parametrize(
    "written",
    [
        "ann@example.com\u200b",  # a zero-width space pasted with it
        "\ufeffann@example.com",  # a byte order mark
        "ann\u00ad@example.com",  # a soft hyphen
        "ann@example.com\u200e",  # a left-to-right mark
        "ann@exam\x01ple.com",  # a control character
        "ann@example.com\x7f",
        "ann@exa\u00a0mple.com",  # a no-break space inside it
        "ann\u00a0@example.com",
        "ann\u200d@example.com",  # a zero-width joiner in the local part
        # In the domain too: UTS-46 transitional processing drops it, so it would be a second key
        # (suppressions, complaints, erasure) for `ann@example.com`; also where IDNA2008 allows it.
        "ann@exa\u200dmple.com",
        "ann@exa\u200cmple.com",
        "ann@\u0915\u094d\u200d\u0937.example",
        "ann smith@example.com",
        "ann@example.com\ue000",  # private use
        "ann@example.com\u0378",  # unassigned
    ],
)
def test_an_address_with_a_character_no_one_delivers_to_is_no_mailbox(written: str) -> None:
    assert mailbox(written) is None
    assert mailbox(f"Ann <{written}>") is None


def test_letters_of_any_script_are_a_mailbox() -> None:
    assert mailbox("José <JOSÉ@example.com>") == "josé@example.com"
    assert mailbox("ann@bücher.de") == "ann@bücher.de"
    assert mailbox("用户@例子.广告") == "用户@例子.广告"
    # A quoted local part may hold a space (RFC 5321); the SMTP client writes it as it is.
    assert mailbox('"ann smith"@example.com') == '"ann smith"@example.com'
    # Spaces around the address are the writing, not the address: a no-break space too (erasing a
    # contact written so tombstoned no `ann@example.com`), as the SMTP envelope gets it.
    assert mailbox("  Ann@Example.com\t") == "ann@example.com"
    assert mailbox("Ann@Example.com\u00a0") == "ann@example.com"
    assert mailbox("\u00a0Ann <Ann@Example.com\u00a0>") == "ann@example.com"


@pytest.mark.parametrize(
    "written",
    ["ann@example.com", "Ann <ann@example.com>", '"a b"@x.com', "josé@example.com", "ann smith@example.com"],
)
def test_a_mailbox_is_an_address_the_smtp_client_can_write(written: str) -> None:
    """What passes `mailbox` reaches the SMTP envelope; what aiosmtplib refuses to write on a command
    line (it raised in the middle of a send, retried as a provider outage) does not pass."""
    try:
        parse_address(written)
    except ValueError:
        assert mailbox(written) is None
    else:
        assert mailbox(written) is not None


@pytest.mark.parametrize(
    ("box", "ascii_form"),
    [
        ("ann@example.com", "ann@example.com"),  # ASCII: as is, case and all
        ("user@bücher.example", "user@xn--bcher-kva.example"),
        ("User@BÜCHER.example", "User@xn--bcher-kva.example"),  # the domain lower-cased, not the local part
        ("ann@例子.广告", "ann@xn--fsqu00a.xn--4rr70v"),
        ("kurt@straße.de", "kurt@xn--strae-oqa.de"),  # IDNA 2008 (nontransitional): ß stays
        ('"a@b"@bücher.example', '"a@b"@xn--bcher-kva.example'),  # the domain is after the last @
    ],
)
def test_a_domain_beyond_ascii_has_its_a_labels_as_ascii_form(box: str, ascii_form: str) -> None:
    assert ascii_mailbox(box) == ascii_form


@pytest.mark.parametrize(
    ("box", "reason"),
    [
        ("josé@example.com", LOCAL_PART_BEYOND_ASCII),
        ("josé@bücher.example", LOCAL_PART_BEYOND_ASCII),
        ("ann@☃.net", DOMAIN_WITHOUT_IDNA),  # not allowed by IDNA 2008
        ("ann@bücher..example", DOMAIN_WITHOUT_IDNA),  # an empty label
        ("ann@" + "ü" * 64 + ".example", DOMAIN_WITHOUT_IDNA),  # a label past 63 octets encoded
        # UTS 46 maps them to another domain: a second key for that mailbox's suppressions,
        # complaints and erasure, so no ASCII form.
        ("ann@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.\uff43\uff4f\uff4d", DOMAIN_WITHOUT_IDNA),
        ("ann@bu\u0308cher.example", DOMAIN_WITHOUT_IDNA),
    ],
)
def test_a_mailbox_without_an_ascii_form_says_why(box: str, reason: str) -> None:
    with pytest.raises(NoAsciiForm) as raised:
        ascii_mailbox(box)
    assert raised.value.reason == reason


@pytest.mark.parametrize(
    ("written", "key"),
    [
        # A domain written with A-labels is the domain of its U-labels, in any case: one key for the
        # profile's `ann@bücher.example` and the `ann@xn--bcher-kva.example` a server without
        # SMTPUTF8 was given (and its bounces and complaints name).
        ("ann@xn--bcher-kva.example", "ann@bücher.example"),
        ("Ann <ANN@XN--BCHER-KVA.EXAMPLE>", "ann@bücher.example"),
        ("ann@xn--fsqu00a.xn--4rr70v", "ann@例子.广告"),
        ("kurt@xn--strae-oqa.de", "kurt@straße.de"),
        ("ann@xn--bcher-kva.bücher.example", "ann@bücher.bücher.example"),  # mixed writings
        # Not a valid A-label (IDNA 2008, and encoding back to itself): as written, lower-cased.
        ("ann@xn--zz.example", "ann@xn--zz.example"),
        ("ann@XN--ABC-.example", "ann@xn--abc-.example"),
        ("ann@xn--.example", "ann@xn--.example"),
        ("ann@xn--ls8h.la", "ann@xn--ls8h.la"),  # an emoji: not IDNA 2008
        # An A-label of a zero-width joiner's label (IDNA 2008 CONTEXTJ): kept as written, since
        # its U-label is no mailbox (`_unsendable`).
        ("ann@xn--11b2ezcw70k.example", "ann@xn--11b2ezcw70k.example"),
        ("ann@example.com", "ann@example.com"),
    ],
)
def test_a_domains_a_labels_are_keyed_as_its_u_labels(written: str, key: str) -> None:
    assert mailbox(written) == key
    assert canonical_domain(written.rpartition("@")[2].rstrip(">")) == key.rpartition("@")[2]


def test_mailboxes_also_name_the_form_keys_had_before_a_labels_were_decoded() -> None:
    """Keys are salted hashes: those made from `ann@xn--bcher-kva.example` before cannot be re-keyed,
    so lookups try both forms, the key's own first, whichever writing the address has now (the
    profile holds `ann@bücher.example` while the relay's bounce named the A-label form)."""
    assert mailboxes("Ann <Ann@XN--BCHER-KVA.example>") == [
        "ann@bücher.example",
        "ann@xn--bcher-kva.example",
    ]
    assert mailboxes("Ann@Bücher.example") == ["ann@bücher.example", "ann@xn--bcher-kva.example"]
    assert mailboxes("kurt@straße.de") == ["kurt@straße.de", "kurt@xn--strae-oqa.de"]
    # No A-label writing decodes to a label IDNA 2008 refuses: nothing else to look up.
    full_width = "x@\uff42\u00fccher.example"  # a full-width b
    assert mailboxes(full_width) == [full_width]
    assert mailboxes("Ann@Example.com") == ["ann@example.com"]
    assert mailboxes("not an address") == []


@pytest.mark.parametrize(
    ("box", "ascii_form"),
    [
        # Mixed writings and upper-case A-labels are that same domain (compared label by label).
        ("ann@xn--bcher-kva.bücher.example", "ann@xn--bcher-kva.xn--bcher-kva.example"),
        ("ann@XN--BCHER-KVA.bücher.example", "ann@xn--bcher-kva.xn--bcher-kva.example"),
    ],
)
def test_a_domain_partly_in_a_labels_has_an_ascii_form(box: str, ascii_form: str) -> None:
    assert ascii_mailbox(box) == ascii_form


@pytest.mark.parametrize(
    "box",
    [
        "user@bücher.example",
        "User@BÜCHER.example",
        "ann@例子.广告",
        "kurt@straße.de",
        "ann@ΣΑΣ.gr",
        "ann@xn--bcher-kva.bücher.example",
        '"a@b"@bücher.example',
    ],
)
def test_the_ascii_form_sent_is_keyed_as_the_address_as_written(box: str) -> None:
    """What a server without SMTPUTF8 is given, and so what its bounces and complaints name, is the
    same key as the address the profile holds."""
    sent = ascii_mailbox(box)
    assert sent.isascii()
    local, _, domain = sent.rpartition("@")
    assert mailbox(sent) == mailbox(f"{local}@{domain.upper()}") == mailbox(box)
