"""`python -m services.segmenter`: run the segmenter service."""

from __future__ import annotations

import uvicorn

from services.segmenter.app import create_app
from services.segmenter.settings import SegmenterSettings
from shared.heap import settle_heap
from shared.observability.logging import configure_logging


def main() -> None:
    settings = SegmenterSettings()
    configure_logging(settings.service_name, settings.log_level)
    app = create_app(settings)
    settle_heap()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        timeout_graceful_shutdown=20,
    )


if __name__ == "__main__":
    main()
