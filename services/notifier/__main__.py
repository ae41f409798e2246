"""`python -m services.notifier`: run the notifier service."""

from __future__ import annotations

from services.notifier.app import create_app
from services.notifier.settings import NotifierSettings
from shared.observability.logging import configure_logging
from shared.runtime import serve


def main() -> None:
    settings = NotifierSettings()
    configure_logging(settings.service_name, settings.log_level)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
