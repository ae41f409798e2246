"""Public endpoints behind the links in messages: unsubscribe (RFC 8058 one-click and a hosted
preference page), the open-tracking pixel and signed click redirects. Tokens are signed; no login."""

from __future__ import annotations

import base64
import html

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from services.notifier.api.dependencies import NotifierDep
from services.notifier.api.forms import read_form
from services.notifier.domain.consent import ALL_TOPICS
from services.notifier.domain.signing import PREVIEW_UNSUBSCRIBE_PATH, InvalidToken, MessageLinks
from services.notifier.service import Notifier
from services.notifier.store import consent_repo
from shared.contracts import Channel
from shared.http import ApiError

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")

api = APIRouter(tags=["links"])


def _verify(notifier: Notifier, purpose: str, token: str) -> dict[str, object]:
    try:
        return notifier.links.signer.verify(purpose, token)
    except InvalidToken as exc:
        raise ApiError(400, "invalid_link", "this link is invalid or was altered") from exc


_STYLE = (
    "body{font-family:sans-serif;max-width:34rem;margin:3rem auto;padding:0 1rem}"
    "button{padding:.5rem 1rem}label{display:block;margin:.3rem 0}"
)


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


# Before `/u/{token}`: the unsubscribe link a template preview shows.
@api.get(PREVIEW_UNSUBSCRIBE_PATH)
@api.post(PREVIEW_UNSUBSCRIBE_PATH)
async def preview_unsubscribe() -> Response:
    return _page(
        "A preview link",
        "<p>This is the unsubscribe link of a template preview. In a real message it leads to the "
        "customer's preferences; here it changes nothing.</p>",
    )


@api.post("/u/{token}")
async def one_click_unsubscribe(token: str, notifier: NotifierDep) -> Response:
    """RFC 8058: the mailbox provider POSTs `List-Unsubscribe=One-Click` here; no confirmation step."""
    claims = _verify(notifier, MessageLinks.UNSUBSCRIBE, token)
    await notifier.unsubscribe(
        str(claims["c"]), str(claims["ch"]), _opt(claims.get("t")), _opt(claims.get("m")), source="one_click"
    )
    return _page("You are unsubscribed", "<p>You will not receive these messages any more.</p>")


@api.get("/u/{token}")
async def preference_page(token: str, notifier: NotifierDep) -> Response:
    """The hosted preference page: current choices, a form to change them, and unsubscribe-all."""
    claims = _verify(notifier, MessageLinks.UNSUBSCRIBE, token)
    customer, channel = str(claims["c"]), str(claims["ch"])
    async with notifier.platform.unit_of_work() as uow:
        topics = await consent_repo.list_topics(uow.session)
        choices = (await consent_repo.choices_for(uow.session, {customer}))[customer]
    all_off = choices.get((ALL_TOPICS, channel)) is False
    rows = []
    for topic in topics:
        if channel not in topic["channels"]:
            continue
        # After "unsubscribe from all" nothing is on: shown checked, a Save without a change
        # re-subscribed the customer to everything.
        on = not all_off and choices.get((topic["id"], channel), topic["default_subscribed"])
        rows.append(
            f"<label><input type='checkbox' name='topic' value='{html.escape(topic['id'])}'"
            f"{' checked' if on else ''}> {html.escape(topic['name'])}</label>"
        )
    body = (
        f"<p>Your {html.escape(channel)} subscriptions.</p>"
        f"<form method='post' action='/u/{html.escape(token)}/preferences'>{''.join(rows)}"
        "<p><button type='submit'>Save</button></p></form>"
        f"<form method='post' action='/u/{html.escape(token)}/all'><p><button type='submit'>"
        f"Unsubscribe from all {html.escape(channel)} marketing</button></p></form>"
        + (
            "<p><em>You are currently unsubscribed from all marketing on this channel.</em></p>"
            if all_off
            else ""
        )
    )
    return _page("Your preferences", body)


@api.post("/u/{token}/all")
async def unsubscribe_all(token: str, notifier: NotifierDep) -> Response:
    claims = _verify(notifier, MessageLinks.UNSUBSCRIBE, token)
    await notifier.unsubscribe(
        str(claims["c"]), str(claims["ch"]), None, _opt(claims.get("m")), source="preference_page"
    )
    return _page("You are unsubscribed", "<p>You will not receive marketing messages on this channel.</p>")


@api.post("/u/{token}/preferences")
async def save_preferences(token: str, request: Request, notifier: NotifierDep) -> Response:
    claims = _verify(notifier, MessageLinks.UNSUBSCRIBE, token)
    wanted = {v for k, v in await read_form(request) if k == "topic"}
    await notifier.save_preferences(
        str(claims["c"]), Channel(str(claims["ch"])), wanted, _opt(claims.get("m"))
    )
    return _page("Preferences saved", "<p>Your choices are saved.</p>")


@api.get("/t/o/{token}.gif")
async def open_pixel(token: str, notifier: NotifierDep) -> Response:
    try:
        claims = notifier.links.signer.verify(MessageLinks.OPEN, token)
        await notifier.record_open(str(claims["m"]))
    except InvalidToken:
        pass  # a pixel never errors visibly
    return Response(PIXEL, media_type="image/gif", headers={"Cache-Control": "no-store, max-age=0"})


@api.get("/t/c/{token}")
async def click(token: str, notifier: NotifierDep) -> Response:
    claims = _verify(notifier, MessageLinks.CLICK, token)
    target = str(claims["u"])
    if not target.startswith(("http://", "https://")):
        raise ApiError(400, "invalid_link", "this link is invalid")
    await notifier.record_click(str(claims["m"]), target)
    return RedirectResponse(target, status_code=302)


def _opt(value: object) -> str | None:
    return str(value) if value not in (None, "") else None
