"""`python -m services.ingest`: run the ingest service."""

from __future__ import annotations

from services.ingest.app import create_app
from services.ingest.settings import IngestSettings
from shared.observability.logging import configure_logging
from shared.runtime import serve


def main() -> None:
    settings = IngestSettings()
    configure_logging(settings.service_name, settings.log_level)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
