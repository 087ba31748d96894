"""The coordinator's HTTP side: the live dashboard page, its JSON API, and Prometheus /metrics."""

from .http import Dashboard, start_dashboard

__all__ = ["Dashboard", "start_dashboard"]
