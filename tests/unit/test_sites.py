"""Sites from measured latencies (coordinator/sites.py): close workers are one site, and a pair
nobody measured takes the typical measured link between their sites instead of the default."""

from __future__ import annotations

import pytest

from coordinator.cost_model import Link
from coordinator.scheduler import LinkView, WorkerView, decide
from coordinator.sites import SiteMap, fill_links, find_sites
from coordinator.scheduler import model_shape
from tests.unit.test_scheduler import run_config

DEFAULT = Link(0.005, 1.0)
NEAR, FAR = Link(0.002, 2.0), Link(0.080, 0.1)


def test_close_pairs_chain_into_sites_and_far_ones_do_not():
    measured = {("a1", "a2"): NEAR, ("a2", "a3"): NEAR, ("b1", "b2"): NEAR, ("a1", "b1"): FAR}
    sites = find_sites(["a1", "a2", "a3", "b1", "b2", "c"], measured, 8.0)
    assert sites == {"a1": "a1", "a2": "a1", "a3": "a1", "b1": "b1", "b2": "b1", "c": "c"}
    assert set(find_sites(["a1", "a2"], measured, 0.0).values()) == {"a1", "a2"}  # 0: every worker its own


def test_an_unmeasured_pair_takes_its_sites_typical_link_and_a_measured_one_keeps_its_own():
    odd = Link(0.100, 0.05)
    measured = {("a1", "a2"): NEAR, ("b1", "b2"): NEAR, ("a1", "b1"): FAR, ("a2", "b2"): FAR, ("a1", "b2"): odd}
    links = fill_links(["a1", "a2", "b1", "b2", "c"], measured, 8.0, DEFAULT)
    assert links[("a2", "b1")] == FAR  # the median of the three measured between the sites
    assert links[("a1", "b2")] == odd  # measured: its own figure
    assert links[("a1", "c")] == DEFAULT  # nothing known of c's site
    assert fill_links(["a2", "b1"], measured, 0.0, DEFAULT)[("a2", "b1")] == DEFAULT  # sites off


def test_sites_found_once_from_every_worker_fill_a_subset_as_if_found_for_it():
    """A decision finds sites once (SiteMap) for all its networks; a network of some workers filled
    from it is the one fill_links finds from the same pairs itself, and a worker the map never saw
    (a proposal's, priced later) is a site of its own."""
    measured = {("a1", "a2"): NEAR, ("b1", "b2"): NEAR, ("a1", "b1"): FAR, ("a2", "b2"): Link(0.09, 0.2)}
    once = SiteMap.find(["a1", "a2", "b1", "b2"], measured, 8.0)
    assert once.sites == {"a1": "a1", "a2": "a1", "b1": "b1", "b2": "b1"}
    for ids in (["a2", "b1"], ["b2", "a1", "c"], ["a1", "a2", "b1", "b2"]):
        assert fill_links(ids, measured, 8.0, DEFAULT, once) == fill_links(ids, measured, 8.0, DEFAULT)
    assert fill_links(["a1", "c"], measured, 8.0, DEFAULT, once)[("a1", "c")] == DEFAULT


def test_a_plan_is_predicted_on_the_link_its_sites_have_not_on_the_default():
    """Two regions: a fast worker far away (x1) and two near each other (n1, n2). n1 measured both
    its links; n2 and x1, the candidates (2 stages x 1 replica), never measured theirs. Without
    sites their link is the default (1 Gbit/s, 5 ms) and the plan looks fast; with sites it is as
    slow as n1-x1, and so is the prediction."""
    shape = model_shape(8, 1024, 4096, 50400)  # activations big enough for the link to matter
    run = run_config(stages=2, replicas=1)
    workers = [WorkerView("n1", "h:n1", 1.0, 24), WorkerView("n2", "h:n2", 1.2, 24),
               WorkerView("x1", "h:x1", 1.5, 24)]
    links = [LinkView("n1", "h:n2", 1.0, 2000.0), LinkView("n1", "h:x1", 150.0, 5.0)]
    with_sites = decide(run, shape, workers, links, None)
    run.scheduler.site_latency_ms = 0.0
    without = decide(run, shape, workers, links, None)
    assert set(with_sites.candidates) == set(without.candidates) == {"n2", "x1"}
    assert with_sites.predicted_step_s > 2 * without.predicted_step_s
    one_link = [LinkView("n2", "h:x1", 150.0, 5.0)]  # had they measured it: the same prediction
    assert decide(run, shape, workers, one_link, None).predicted_step_s == \
        pytest.approx(with_sites.predicted_step_s, rel=0.01)
