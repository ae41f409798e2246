"""Notifier: Templates, consent, channel providers and delivery status."""
