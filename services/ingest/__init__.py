"""Ingest: Segment-compatible event API: validates customer events and puts them durably on clm.events.v1."""
