"""Templates: locale choice, filters, strict undefined, sandboxing, escaping, validation."""

from __future__ import annotations

import pytest

from services.notifier.domain.templates import (
    RenderError,
    TemplateDefinition,
    TemplateRenderer,
    choose_locale,
    format_date,
    money,
)
from shared.contracts import Channel

renderer = TemplateRenderer(max_output_chars=10_000, max_loop_iterations=100)


def template(channel: Channel = Channel.SMS, **variants: dict[str, str]) -> TemplateDefinition:
    return TemplateDefinition("t", channel, "en", variants or {"en": {"body": "hi"}})


def test_locale_falls_back_from_region_to_language_to_default() -> None:
    available = {"en": {}, "fr": {}, "pt-BR": {}}
    assert choose_locale(available, "fr-CA", "en") == "fr"
    assert choose_locale(available, "pt_br", "en") == "pt-BR"
    assert choose_locale(available, "de", "en") == "en"
    assert choose_locale(available, None, "en") == "en"
    assert choose_locale({"fr": {}}, "de", "en") == "fr"


def test_renders_traits_event_and_filters() -> None:
    t = template(
        en={
            "body": "{{ traits.name | default: 'there' }} paid {{ event.total | money: 'USD' }} "
            "on {{ event.at | format_date: '%d/%m/%Y %H:%M', 'Europe/Paris' }}"
        }
    )
    out = renderer.render(t, "en", {"traits": {}, "event": {"total": -1234.5, "at": "2026-03-01T23:30:00Z"}})
    assert out.part("body") == "there paid -$1,234.50 on 02/03/2026 00:30"


def test_money_and_dates() -> None:
    assert money(1234.5, "EUR", "de") == "1.234,50 €"
    assert money("99", "JPY") == "¥99"
    assert money(3, "SEK") == "SEK 3.00"
    with pytest.raises(RenderError):
        money("lots")
    assert format_date("2026-01-05", "%Y") == "2026"
    with pytest.raises(RenderError):
        format_date("2026-01-05", "%Y", "Mars/Base")
    # Hostile values are a render error (the message fails with a reason), never an exception
    # that escapes the delivery loop.
    for value, zone in [
        ("9999-12-31T23:00:00", "Pacific/Kiritimati"),  # past year 9999 once shifted east
        (1e20, None),  # seconds since the epoch past any datetime
        ("2026-01-05", "a" * 300),  # a zone name too long for the file system
    ]:
        with pytest.raises(RenderError):
            format_date(value, "%Y", zone)


def test_an_undefined_variable_is_an_error_not_an_empty_string() -> None:
    with pytest.raises(RenderError, match="first_name is undefined"):
        renderer.render(template(en={"body": "Hi {{ traits.first_name }}"}), "en", {"traits": {}})


def test_templates_cannot_include_files_or_loop_forever() -> None:
    with pytest.raises(RenderError, match="unexpected tag 'include'"):
        renderer.render(template(en={"body": "{% include 'secrets.txt' %}"}), "en", {})
    with pytest.raises(RenderError):
        renderer.render(template(en={"body": "{% for i in (1..100000) %}x{% endfor %}"}), "en", {})


def test_html_parts_are_escaped_text_parts_are_not() -> None:
    t = template(Channel.EMAIL, en={"subject": "{{ n }}", "html": "<p>{{ n }}</p>", "text": "{{ n }}"})
    out = renderer.render(t, "en", {"n": "<b>&"})
    assert out.part("html") == "<p>&lt;b&gt;&amp;</p>"
    assert out.part("text") == "<b>&" and out.part("subject") == "<b>&"


def test_webhook_payload_must_render_to_json() -> None:
    good = template(Channel.WEBHOOK, en={"payload": '{"name": {{ traits.name | json }}}'})
    assert (
        renderer.render(good, "en", {"traits": {"name": 'a "b"'}}).part("payload") == '{"name": "a \\"b\\""}'
    )
    bad = template(Channel.WEBHOOK, en={"payload": '{"name": {{ traits.name }}}'})
    with pytest.raises(RenderError, match="not valid JSON"):
        renderer.render(bad, "en", {"traits": {"name": "x"}})


def test_validation_names_missing_unknown_and_broken_parts() -> None:
    problems = dict(renderer.validate(Channel.PUSH, {"en": {"title": "{% if %}", "subject": "x"}}))
    assert set(problems) == {"variants.en.body", "variants.en.subject", "variants.en.title"}
    assert renderer.validate(Channel.PUSH, {"en": {"title": "a", "body": "b"}}) == []


def test_validation_names_unknown_filters_and_partials_with_their_part() -> None:
    # Unknown filters parsed: `strict_filters` failed them only at render, so every send failed.
    problems = renderer.validate(
        Channel.EMAIL,
        {
            "en": {
                "subject": "Hi {{ traits.name | upcase2 }}",
                "html": "<p>{{ total | money: 'EUR' | upcase }}</p>\n{% if x %}{{ y | nope }}{% endif %}",
                "text": "{% render 'footer' %}",
            },
            "fr": {"subject": "{% liquid\necho a | shout\n%}", "html": "{% include 'x' %}", "text": "t"},
        },
    )
    assert problems == [
        ("variants.en.subject", "unknown filter 'upcase2' (line 1, column 20)"),
        ("variants.en.html", "unknown filter 'nope' (line 2, column 17)"),
        ("variants.en.text", "LiquidSyntaxError: unexpected tag 'render'"),
        ("variants.fr.subject", "unknown filter 'shout' (line 2, column 9)"),
        ("variants.fr.html", "LiquidSyntaxError: unexpected tag 'include'"),
    ]
    usable = "{{ a | default: 'x' | json }} {{ b | format_date: '%Y' }} {% unsubscribe_link %} {{ c | size }}"
    assert renderer.validate(Channel.SMS, {"en": {"body": usable}}) == []


def test_only_an_undefined_variable_is_data_that_may_still_arrive() -> None:
    # The delivery worker waits for an unseen customer's profile only on `missing_data`.
    for body in ["{{ traits.first_name }}", "{{ traits.plan | json }}", "{{ traits.total | money }}"]:
        with pytest.raises(RenderError) as undefined:
            renderer.render(template(en={"body": body}), "en", {"traits": {}})
        assert undefined.value.missing_data, body
        assert "is undefined" in str(undefined.value), body
    for body in ["{{ traits.name | upcase2 }}", "{{ traits.total | money }}"]:
        with pytest.raises(RenderError) as broken:
            renderer.render(template(en={"body": body}), "en", {"traits": {"name": "a", "total": "lots"}})
        assert not broken.value.missing_data, body


def test_the_unsubscribe_link_tag_outputs_the_signed_url() -> None:
    t = template(
        Channel.EMAIL,
        en={
            "subject": "s",
            "html": '<a href="{% unsubscribe_link %}">u</a>',
            "text": "Stop: {% unsubscribe_link %}",
        },
    )
    out = renderer.render(t, "en", {"unsubscribe_url": "https://n.example.com/u/a.b?x=1&y=2"})
    assert out.part("html") == '<a href="https://n.example.com/u/a.b?x=1&amp;y=2">u</a>'
    assert out.part("text") == "Stop: https://n.example.com/u/a.b?x=1&y=2"
    assert renderer.render(t, "en", {}).part("text") == "Stop: "
