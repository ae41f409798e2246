"""How routers reach the running notifier."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.notifier.service import Notifier


def get_notifier(request: Request) -> Notifier:
    notifier: Notifier = request.app.state.notifier
    return notifier


NotifierDep = Annotated[Notifier, Depends(get_notifier)]
