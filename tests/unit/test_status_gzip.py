"""The gzipped status: read back whole, and refused when it is cut, padded, corrupt or a bomb."""

from __future__ import annotations

import gzip
import json

import pytest

from coordinator.dashboard.http import _accepts_gzip
from gptjt_core.status_gzip import BadStatusGzip, gunzip_status, gzip_status

STATUS = json.dumps({"step": 3, "workers": [{"id": f"w{i}", "metrics": {"busy_fraction": 0.5}} for i in range(500)]})


def test_a_status_comes_back_byte_for_byte_and_the_same_status_gzips_the_same():
    body = STATUS.encode()
    packed = gzip_status(body)
    assert gunzip_status(packed) == body and gzip.decompress(packed) == body  # any gzip reader reads it
    assert len(packed) < len(body) / 5  # the repeated keys of a worker list compress well
    assert gzip_status(body) == packed  # no timestamp in the header


@pytest.mark.parametrize("damage, words", [
    (lambda p: p[:len(p) // 2], "truncated"),
    (lambda p: p + b"\x1f\x8b more", "followed by 7 bytes"),
    (lambda p: p[:10] + bytes(b ^ 0xFF for b in p[10:20]) + p[20:], "corrupt"),
    (lambda p: b"not gzip at all", "corrupt"),
])
def test_a_damaged_status_is_refused_with_what_is_wrong(damage, words):
    with pytest.raises(BadStatusGzip, match=words):
        gunzip_status(damage(gzip_status(STATUS.encode())))


def test_a_status_that_inflates_past_the_bound_is_refused_without_inflating_it_all():
    bomb = gzip_status(b"0" * 10_000_000)  # ~44 KB (level 1) that inflate to 10 MB
    assert len(bomb) < 50_000
    with pytest.raises(BadStatusGzip, match="inflates past 1000000 bytes"):
        gunzip_status(bomb, max_bytes=1_000_000)
    assert len(gunzip_status(bomb, max_bytes=10_000_000)) == 10_000_000  # exactly the bound is allowed


@pytest.mark.parametrize("header, accepted", [
    ("gzip", True), ("gzip, deflate, br", True), ("br;q=1.0, GZIP;q=0.5", True), ("x-gzip", True),
    ("", False), ("identity", False), ("deflate, br", False), ("gzip;q=0", False), ("gzip; q=0.000", False),
    ("gzipped", False),
])
def test_the_dashboard_gzips_only_for_a_client_that_takes_gzip(header, accepted):
    assert _accepts_gzip(header) is accepted
