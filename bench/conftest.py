"""Bench set-up. Shared helpers live in bench/bench_helpers.py (importable), not here."""
