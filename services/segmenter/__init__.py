"""Segmenter: Live customer profiles, identity resolution, lifecycle metrics and real-time segments."""
