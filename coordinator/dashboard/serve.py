"""Where the dashboard listens: its bind address, HTTPS with the coordinator's certificate, and the
warning when a plaintext dashboard faces a network."""

from __future__ import annotations

import ipaddress
import ssl

from .http import Dashboard


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (bracketed or not) and 'localhost'; False for wildcards and other names."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a DNS name: assume it faces a network


def exposure_warning(host: str, tls: bool) -> str:
    """'' unless the admin token would cross a network in clear (plain HTTP on a non-loopback host)."""
    if tls or is_loopback(host):
        return ""
    return (f"the dashboard serves plain HTTP on {host}, not a loopback address: the admin token of its admin "
            "actions crosses the network in clear. Set coordinator.tls_cert and tls_key (the dashboard then "
            "serves HTTPS), keep coordinator.dashboard_host = \"127.0.0.1\" and reach it over SSH, or put a "
            "TLS-terminating proxy in front of it")


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context over the coordinator's PEM certificate chain and key (what its gRPC API serves)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def start_dashboard(host: str, port: int, ledger, actions, tls: tuple[str, str] | None = None,
                          reader=None) -> Dashboard:
    """Bind host:port (port 0: any free port) and serve on the running event loop; HTTPS when
    tls = (certificate, key) PEM paths are given; reading needs the read (or admin) token when a
    ReadToken `reader` is given. Raises OSError when it cannot bind or read them."""
    context = tls_context(*tls) if tls else None
    dashboard = await Dashboard(ledger, actions, reader=reader, statuses=actions.coordinator.statuses).start(
        host, port, context)
    dashboard.exposure = exposure_warning(host, tls is not None)
    return dashboard
