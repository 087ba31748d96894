"""A worker behind NAT serves a stage through the coordinator's relay (local_swarm/nat_lab.py).

The home namespace sits behind a masquerading router with no port forwarding; its worker holds
stage 1 (the last) of a 2-stage run whose coordinator and stage 0 are on the public side. The
home worker finds at start that the relay cannot reach it, serves through the relay, and the
run completes exactly once on train-local's losses. Skips without root or iptables.
"""

from __future__ import annotations

import pytest

from local_swarm.nat_lab import NatLab, NatSwarm
from tests.swarm import local_losses


@pytest.fixture()
def nat_swarm(tmp_path):
    why = NatLab.unavailable()
    if why:
        pytest.skip(why)
    lab = NatLab()
    try:
        lab.__enter__()
    except RuntimeError as e:
        if "iptables" in str(e):  # installed, but this kernel (a container's) has no NAT table
            pytest.skip(f"no NAT on this machine: {e}")
        raise
    swarm = NatSwarm(lab, tmp_path, steps=4)
    try:
        yield swarm
    finally:
        swarm.close()
        lab.__exit__()


def test_a_worker_behind_nat_serves_its_stage_through_the_relay(nat_swarm):
    swarm = nat_swarm
    swarm.start()
    status = swarm.wait_done(240)
    home = (swarm.workdir / "worker-home.log").read_text()
    assert "is not reachable from the relay" in home and "serving through the relay as" in home
    assert "reachable directly at" in (swarm.workdir / "worker-public.log").read_text()
    workers = {w["name"]: w for w in status["workers"]}
    assert workers["home"]["stage"] == 1 and workers["home"]["address"].startswith(swarm.lab.public_ip + ":")
    assert status["tickets"]["exactly_once_violations"] == []
    assert (status["tickets"]["lost"], status["tickets"]["double"]) == (0, 0)
    expected, _ = local_losses(swarm.config, swarm.steps)
    assert [h["loss"] for h in status["history"]] == pytest.approx(expected, rel=1e-6, abs=1e-6)
