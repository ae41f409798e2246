"""How routers reach the running notifier."""

from __future__ import annotations

from fastapi import Request

from services.notifier.service import Notifier


def get_notifier(request: Request) -> Notifier:
    notifier: Notifier = request.app.state.notifier
    return notifier
