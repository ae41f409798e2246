"""`python -m services.journey_engine`: run the journey engine service."""

from __future__ import annotations

from services.journey_engine.app import create_app
from services.journey_engine.settings import JourneyEngineSettings
from shared.observability.logging import configure_logging
from shared.runtime import serve


def main() -> None:
    settings = JourneyEngineSettings()
    configure_logging(settings.service_name, settings.log_level)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
