"""`python -m services.segmenter`: run the segmenter service."""

from __future__ import annotations

from services.segmenter.app import create_app
from services.segmenter.settings import SegmenterSettings
from shared.observability.logging import configure_logging
from shared.runtime import serve


def main() -> None:
    settings = SegmenterSettings()
    configure_logging(settings.service_name, settings.log_level)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
