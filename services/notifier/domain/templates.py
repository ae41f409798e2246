"""Liquid templates: per-channel parts, locale variants, filters, and rendering that never half-succeeds.

Decisions (see docs/services/notifier.md):
- Undefined variables are errors (`StrictDefaultUndefined`): a typo fails the message with a reason
  instead of sending "Hello ,"; `{{ x | default: "there" }}` is the way to make a value optional.
- Templates see only the data they are given: no loader and no `include`/`render` tags, no
  globals, loop and output limits against runaway templates.
- Validation refuses what parses but could never render (unknown filters), so a broken template
  is a 400 when it is saved, not a failure of every send.
- HTML parts are auto-escaped (trait values cannot inject markup); other parts are plain text.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from liquid import (
    BoundTemplate,
    DictLoader,
    Environment,
    RenderContext,
    StrictDefaultUndefined,
    TokenStream,
    Undefined,
    ast,
)
from liquid.exceptions import LiquidError, UndefinedError
from liquid.tag import Tag
from liquid.token import TOKEN_TAG

from shared.contracts import Channel

REQUIRED_PARTS: dict[Channel, tuple[str, ...]] = {
    Channel.EMAIL: ("subject", "html", "text"),
    Channel.SMS: ("body",),
    Channel.PUSH: ("title", "body"),
    Channel.WEBHOOK: ("payload",),
    Channel.IN_APP: ("title", "body"),
}
HTML_PARTS = frozenset({"html"})

_CURRENCY_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥", "INR": "₹", "CHF": "CHF "}
# Locales that write 1.234,56 € rather than €1,234.56.
_COMMA_DECIMAL_LOCALES = ("de", "fr", "es", "it", "nl", "pt", "pl", "sv", "da", "fi", "nb", "cs")


class RenderError(Exception):
    """The template could not be rendered with this data; the message fails with this reason.
    `missing_data`: a variable was undefined, which the customer's profile, still on its way, may
    supply; anything else (an unknown filter, a value a filter cannot take) no later try can fix."""

    def __init__(self, message: str, *, missing_data: bool = False) -> None:
        super().__init__(message)
        self.missing_data = missing_data


@dataclass(frozen=True)
class TemplateDefinition:
    id: str
    channel: Channel
    default_locale: str
    # locale -> part -> Liquid source
    variants: Mapping[str, Mapping[str, str]]
    version: int = 1


@dataclass(frozen=True)
class RenderedMessage:
    template_id: str
    locale: str
    parts: dict[str, str]

    def part(self, name: str) -> str:
        return self.parts.get(name, "")


def choose_locale(available: Mapping[str, Any], wanted: str | None, default: str) -> str:
    """`fr-CA` -> `fr-CA`, else `fr`, else the template's default, else any variant."""
    if wanted:
        normalized = wanted.replace("_", "-")
        for candidate in (normalized, normalized.split("-")[0]):
            for locale in available:
                if locale.lower() == candidate.lower():
                    return locale
    if default in available:
        return default
    return next(iter(available))


# --------------------------------------------------------------------------- filters


def money(amount: Any, currency: str = "USD", locale: str = "en") -> str:
    """`{{ 1234.5 | money: "EUR", "fr" }}` -> `1.234,50 €`; amounts are decimals, not cents."""
    try:
        value = Decimal(str(amount))
    except (InvalidOperation, ValueError) as exc:
        raise RenderError(f"money: {amount!r} is not a number") from exc
    code = str(currency).upper()
    text = f"{abs(value):,.{0 if code == 'JPY' else 2}f}"
    sign = "-" if value < 0 else ""
    if str(locale).split("-")[0].lower() in _COMMA_DECIMAL_LOCALES:
        text = text.replace(",", " ").replace(".", ",").replace(" ", ".")
        return f"{sign}{text} {_CURRENCY_SYMBOLS.get(code, code + ' ').strip()}"
    return f"{sign}{_CURRENCY_SYMBOLS.get(code, code + ' ')}{text}"


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, (int, float)):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise RenderError(f"not a date: {value!r}") from exc
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as exc:
        raise RenderError(f"not a date: {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_date(value: Any, fmt: str = "%Y-%m-%d", timezone: str | None = None) -> str:
    """`{{ event.properties.at | format_date: "%d %b %Y %H:%M", traits.timezone }}`."""
    moment = _as_datetime(value)
    if timezone:
        try:
            zone = ZoneInfo(str(timezone))
        except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: a name too long
            raise RenderError(f"unknown timezone {timezone!r}") from exc
        try:
            moment = moment.astimezone(zone)
        except OverflowError as exc:  # 9999-12-31 east of UTC
            raise RenderError(f"not a date in {timezone}: {value!r}") from exc
    return moment.strftime(str(fmt))


def json_value(value: Any) -> str:
    """`{{ traits.name | json }}`: a JSON literal, for webhook payload templates."""
    if isinstance(value, Undefined):
        str(value)  # a strict undefined raises its own UndefinedError ("traits.name is undefined")
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError as exc:
        raise RenderError(f"json: cannot encode {type(value).__name__}") from exc


class UnsubscribeLinkNode(ast.Node):
    """`{% unsubscribe_link %}`: this message's signed unsubscribe URL (empty for transactional)."""

    def __str__(self) -> str:
        return "{% unsubscribe_link %}"

    def render_to_output(self, context: RenderContext, buffer: TextIO) -> int:
        url = context.resolve("unsubscribe_url", default="")
        text = url if isinstance(url, str) else ""
        return buffer.write(html.escape(text, quote=True) if context.env.autoescape else text)


class UnsubscribeLinkTag(Tag):
    name = "unsubscribe_link"
    block = False

    def parse(self, stream: TokenStream) -> ast.Node:
        stream.expect(TOKEN_TAG, value=self.name)
        return UnsubscribeLinkNode(stream.current)


class _SandboxedEnvironment(Environment):
    # Class-level limits in python-liquid; set per subclass instance below.
    loop_iteration_limit: ClassVar[int | None] = 10_000
    output_stream_limit: ClassVar[int | None] = 1_000_000


def _environment(autoescape: bool, max_output: int, max_loops: int) -> Environment:
    env_class = type(
        "NotifierLiquidEnvironment",
        (_SandboxedEnvironment,),
        {"loop_iteration_limit": max_loops, "output_stream_limit": max_output},
    )
    env: Environment = env_class(
        undefined=StrictDefaultUndefined, autoescape=autoescape, loader=DictLoader({}), strict_filters=True
    )
    env.add_tag(UnsubscribeLinkTag)
    # No loader, so no partials: `include`/`render` would only fail at send time; unknown, they are
    # refused when the template is saved, as any unknown tag is.
    for partial_tag in ("include", "render"):
        env.tags.pop(partial_tag, None)
    env.add_filter("money", money)
    env.add_filter("format_date", format_date)
    env.add_filter("json", json_value)
    return env


class TemplateRenderer:
    """Compiles each template part once (per template version) and renders with the given data only."""

    def __init__(self, *, max_output_chars: int = 1_000_000, max_loop_iterations: int = 10_000) -> None:
        self._text = _environment(False, max_output_chars, max_loop_iterations)
        self._html = _environment(True, max_output_chars, max_loop_iterations)
        # Keyed by source, so an edited template is recompiled and an unchanged one never is.
        self._compiled: dict[tuple[bool, str], BoundTemplate] = {}

    def validate(self, channel: Channel, variants: Mapping[str, Mapping[str, str]]) -> list[tuple[str, str]]:
        """(field, problem) for every missing, unparsable or unrenderable part (an unknown filter);
        empty when the template is usable."""
        problems: list[tuple[str, str]] = []
        if not variants:
            problems.append(("variants", "at least one locale variant is required"))
        for locale, parts in variants.items():
            for name in REQUIRED_PARTS[channel]:
                if name not in parts:
                    problems.append(
                        (f"variants.{locale}.{name}", f"{channel.value} templates need a {name!r} part")
                    )
            for name, source in parts.items():
                if name not in REQUIRED_PARTS[channel]:
                    problems.append((f"variants.{locale}.{name}", f"unknown part for {channel.value}"))
                    continue
                env = self._env(name)
                try:
                    parsed = env.from_string(source)
                except LiquidError as exc:
                    problems.append((f"variants.{locale}.{name}", _first_line(exc)))
                    continue
                problems.extend(
                    (f"variants.{locale}.{name}", p) for p in _unknown_filters(env, parsed, source)
                )
        return problems

    def render(
        self, template: TemplateDefinition, locale: str | None, data: Mapping[str, Any]
    ) -> RenderedMessage:
        chosen = choose_locale(template.variants, locale, template.default_locale)
        parts: dict[str, str] = {}
        for name, source in template.variants[chosen].items():
            key = (name in HTML_PARTS, source)
            try:
                compiled = self._compiled.get(key)
                if compiled is None:
                    compiled = self._env(name).from_string(source)
                    if len(self._compiled) > 5000:
                        self._compiled.clear()
                    self._compiled[key] = compiled
                parts[name] = compiled.render(**data)
            except RenderError as exc:
                raise RenderError(f"{name}: {exc}", missing_data=_undefined(exc)) from exc
            except LiquidError as exc:
                raise RenderError(f"{name}: {_first_line(exc)}", missing_data=_undefined(exc)) from exc
            except Exception as exc:  # a filter given a value it cannot take: still the template's fault
                raise RenderError(
                    f"{name}: {type(exc).__name__}: {exc}", missing_data=_undefined(exc)
                ) from exc
        if template.channel is Channel.WEBHOOK:
            try:
                orjson.loads(parts["payload"])
            except orjson.JSONDecodeError as exc:
                raise RenderError(f"payload: not valid JSON after rendering ({exc})") from exc
        return RenderedMessage(template.id, chosen, parts)

    def _env(self, part: str) -> Environment:
        return self._html if part in HTML_PARTS else self._text


def _unknown_filters(env: Environment, template: BoundTemplate, source: str) -> list[str]:
    """Filters the environment does not have. They parse; `strict_filters` fails them only when a
    message renders, so every send of the template would fail."""
    try:
        found = template.analyze(include_partials=False).filters
    except LiquidError as exc:
        return [_first_line(exc)]
    problems = []
    for name, spans in found.items():
        if name not in env.filters:
            try:
                line, column = spans[0].line_col(source)
                where = f" (line {line}, column {column})"
            except ValueError:
                where = ""
            problems.append(f"unknown filter {name!r}{where}")
    return problems


def _undefined(exc: BaseException) -> bool:
    """An undefined variable is somewhere in the chain (a filter may have wrapped it)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, UndefinedError) or getattr(seen, "missing_data", False):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(exc: Exception) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
