"""Prometheus metrics every service exposes on `/metrics`."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HTTP_REQUESTS = Counter(
    "clm_http_requests_total", "HTTP requests handled", ["service", "method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "clm_http_request_duration_seconds",
    "HTTP request latency",
    ["service", "method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
CONSUMED = Counter("clm_consumer_messages_total", "Messages handled by a consumer", ["service", "topic"])
CONSUMER_LAG = Gauge(
    "clm_consumer_lag", "Messages behind the partition's end", ["service", "topic", "partition"]
)
HANDLER_ERRORS = Counter(
    "clm_consumer_handler_errors_total", "Handler failures (each attempt)", ["service", "topic"]
)
HANDLER_SECONDS = Histogram(
    "clm_consumer_batch_seconds",
    "Time to handle one batch",
    ["service", "topic"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
CONSUMER_UNITS = Gauge(
    "clm_consumer_units_in_flight", "Units of work a consumer is running", ["service", "topic"]
)
CONSUMER_BUFFERED = Gauge(
    "clm_consumer_buffered", "Records fetched and waiting for a unit of work", ["service", "topic"]
)
DLQ_MESSAGES = Counter("clm_dlq_messages_total", "Messages sent to a dead-letter topic", ["service", "topic"])
OUTBOX_RELAYED = Counter("clm_outbox_relayed_total", "Outbox messages published to Kafka", ["service"])
OUTBOX_PARKED = Counter(
    "clm_outbox_parked_total",
    "Outbox messages too large for Kafka, moved to outbox_parked",
    ["service", "topic"],
)
OUTBOX_PENDING = Gauge(
    "clm_outbox_pending", "Outbox messages taken by the last relay pass (0: none were waiting)", ["service"]
)


def _route_of(request: Request) -> str:
    # Label by route template, not raw path: ids in paths would explode cardinality.
    route = request.scope.get("route")
    if route is not None:
        return str(getattr(route, "path", "unmatched"))
    for candidate in request.app.router.routes:
        match, _ = candidate.matches(request.scope)
        if match == Match.FULL:
            return str(getattr(candidate, "path", "unmatched"))
    return "unmatched"


class HttpMetricsMiddleware:
    """Counts and times every HTTP request. A plain ASGI middleware: Starlette's BaseHTTPMiddleware
    (`@app.middleware("http")`) costs about 1 ms of CPU per request (measured on the ingest hot path)."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            request = Request(scope)
            route = _route_of(request)
            HTTP_REQUESTS.labels(self.service, request.method, route, str(status)).inc()
            HTTP_LATENCY.labels(self.service, request.method, route).observe(time.perf_counter() - started)


def instrument(app: FastAPI, service: str) -> None:
    app.add_middleware(HttpMetricsMiddleware, service=service)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
