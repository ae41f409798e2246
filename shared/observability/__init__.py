"""JSON logs, health/readiness endpoints and Prometheus metrics."""
