"""Benchmarks: `make bench-<name>` starts a fresh broker and database and runs `python -m bench.<name>`.

Each prints its figures, compares against a baseline measured in the same run (a ratio), and ends
with one line `name=value`.
"""
