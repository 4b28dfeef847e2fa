"""Observability: Prometheus metrics (metrics.py), tracing (tracing.py), logs (logs.py)."""
