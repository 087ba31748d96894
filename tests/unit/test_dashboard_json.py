"""The dashboard's strict JSON (NaN and ±Infinity become null) and the check of its bind address."""

from __future__ import annotations

import json
import math

import pytest

from coordinator.finite_json import dumps, finite
from coordinator.dashboard.serve import exposure_warning, is_loopback


def strict_loads(body: bytes):
    """JSON.parse's rules: the bare words NaN, Infinity and -Infinity are errors."""
    def refuse(word: str):
        raise ValueError(f"{word} is not JSON")

    return json.loads(body, parse_constant=refuse)


def test_non_finite_floats_become_null_at_any_depth():
    status = {"loss": math.nan, "eta_s": math.inf, "lr": 1e-3, "step": 3, "paused": False, "run": "r",
              "workers": [{"metrics": {"micro_batches_per_s": -math.inf, "busy_fraction": 0.5}, "stage": None}],
              "history": ({"loss": math.nan, "seconds": 1.25},)}
    assert finite(status) == {"loss": None, "eta_s": None, "lr": 1e-3, "step": 3, "paused": False, "run": "r",
                              "workers": [{"metrics": {"micro_batches_per_s": None, "busy_fraction": 0.5},
                                           "stage": None}],
                              "history": [{"loss": None, "seconds": 1.25}]}
    assert strict_loads(dumps(status))["workers"][0]["metrics"]["micro_batches_per_s"] is None
    assert math.isnan(status["loss"])  # the caller's object is left as it was


def test_finite_values_pass_unchanged():
    value = {"a": [0.0, -1.5, 1e308, 7, True, None, "NaN"], "b": {"c": 2 ** 70}}
    assert finite(value) == value and strict_loads(dumps(value)) == value


def test_dumps_refuses_what_finite_cannot_clean():
    class Number(float):  # a float subclass is still a float: cleaned, not passed through
        pass

    assert dumps({"x": Number("nan")}) == b'{"x": null}'
    with pytest.raises(TypeError):
        dumps({"x": {1, 2}})  # not JSON at all: a bug in the caller, said so


@pytest.mark.parametrize("host", ["127.0.0.1", "127.5.0.1", "::1", "[::1]", "localhost"])
def test_loopback_hosts_are_quiet(host):
    assert is_loopback(host) and exposure_warning(host, tls=False) == ""


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "192.168.1.10", "coordinator.example.org"])
def test_plaintext_beyond_loopback_is_warned_and_tls_quiets_it(host):
    assert not is_loopback(host)
    warning = exposure_warning(host, tls=False)
    assert f"plain HTTP on {host}" in warning and "admin token" in warning and "tls_cert" in warning
    assert exposure_warning(host, tls=True) == ""

