"""The coordinator's HTTP side: the live dashboard page, its JSON API, and Prometheus /metrics."""

from .http import Dashboard
from .serve import start_dashboard

__all__ = ["Dashboard", "start_dashboard"]
