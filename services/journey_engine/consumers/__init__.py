"""Thin Kafka handlers."""
