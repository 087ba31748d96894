"""The scheduler's cost model on hand-computed cases (pure: no processes)."""

import pytest

from coordinator.cost_model import (
    Device, Link, ModelShape, Network, StagePlacement, Workload, infeasible, memory_needed_gb, predict_step,
    stage_params,
)

# 4 layers of 1e9 parameters, d 1000, embedding and head 1e8 each: round numbers by hand
MODEL = ModelShape(n_layer=4, d_model=1000, layer_params=10**9, embed_params=10**8, head_params=10**8)
WORK = Workload(tokens_per_micro_batch=1000, micro_batches=10, in_flight=2, activation_bytes_per_value=2.0,
                gradient_bytes_per_param=2.0, precision="fp32")
NET = Network({("a", "b"): Link(0.05, 1.0)}, inside=Link(0.001, 10.0))


def devices(*specs) -> list[Device]:
    return [Device(f"w{i}", tflops, mem, site) for i, (tflops, mem, site) in enumerate(specs)]


def test_two_stages_one_worker_each_by_hand():
    devs = devices((100.0, 80.0, "a"), (100.0, 80.0, "b"))
    plan = [StagePlacement(0, 2, (0,)), StagePlacement(2, 4, (1,))]
    est = predict_step(plan, devs, NET, MODEL, WORK)
    # stage 0: 6 x 2e9 matmul params x 1000 tokens / 100 TFLOP/s = 0.12 s (the embedding costs no FLOPs)
    # stage 1: 6 x 2.1e9 x 1000 / 1e14 = 0.126 s
    assert est.compute_s == pytest.approx((0.12, 0.126))
    # boundary: 1000 tokens x 1000 x 2 bytes = 2 MB = 16 Mbit at 1 Gbit/s = 16 ms, + 50 ms latency
    assert est.transfer_s == pytest.approx((0.066,))
    # fill + drain: 0.12 + 0.126 + 2 x 0.066; then 9 more micro-batches at the slowest, 0.126
    assert est.pipeline_s == pytest.approx(0.378 + 9 * 0.126)
    assert est.averaging_s == 0.0 and est.step_s == pytest.approx(est.pipeline_s)


def test_the_head_is_priced_at_its_own_measured_rate():
    """The LM head's softmax over the vocabulary is memory-bound: a device measured at half its
    block rate on the head (worker/probe.measure_head_tflops) makes only the head slower."""
    slow_head = [Device("w0", 100.0, 80.0, "a"), Device("w1", 100.0, 80.0, "b", head_tflops=50.0)]
    plan = [StagePlacement(0, 2, (0,)), StagePlacement(2, 4, (1,))]
    est = predict_step(plan, slow_head, NET, MODEL, WORK)
    # stage 1: blocks 6 x 2e9 x 1000 / 1e14 = 0.12 s, head 6 x 1e8 x 1000 / 5e13 = 0.012 s
    assert est.compute_s == pytest.approx((0.12, 0.132))
    # a replica group adds its head rates as it adds its block rates; 0 means "not measured": tflops
    group = [Device("w0", 100.0, 80.0, "a", head_tflops=50.0), Device("w1", 100.0, 80.0, "a")]
    est = predict_step([StagePlacement(0, 4, (0, 1))], group, NET, MODEL, WORK)
    assert est.compute_s[0] == pytest.approx(6 * 4e9 * 1000 / 2e14 + 6 * 1e8 * 1000 / 1.5e14)


def test_replicas_add_compute_and_pay_for_averaging():
    devs = devices((100.0, 80.0, "a"), (100.0, 80.0, "a"), (100.0, 80.0, "b"))
    plan = [StagePlacement(0, 2, (0, 1)), StagePlacement(2, 4, (2,))]
    est = predict_step(plan, devs, NET, MODEL, WORK)
    assert est.compute_s[0] == pytest.approx(0.06)  # two replicas share the micro-batches
    # ring all-reduce of 2.1e9 params x 2 bytes over 10 Gbit/s: 2 x 1/2 x 33.6 Gbit / 10 + 2 x 1 ms
    assert est.averaging_s == pytest.approx(33.6 / 10 + 0.002)
    # a replica group across the slow link pays its bandwidth
    spread = [StagePlacement(0, 2, (0, 2)), StagePlacement(2, 4, (1,))]
    assert predict_step(spread, devs, NET, MODEL, WORK).averaging_s == pytest.approx(33.6 / 1 + 0.1)


def test_memory_limits_name_the_worker():
    # stage 0 with 2 layers: (2e9 + 1e8) x (4 + 4 + 8) bytes = 33.6 GB of weights, gradients and
    # Adam moments + 2 micro-batches in flight x 2 blocks x 106 bytes x 1000 tokens x d 1000 (fp32)
    assert memory_needed_gb(MODEL, WORK, 0, 2) == pytest.approx(33.6 + 0.424)
    devs = devices((100.0, 80.0, "a"), (100.0, 24.0, "b"))
    plan = [StagePlacement(0, 2, (0,)), StagePlacement(2, 4, (1,))]
    why = infeasible(plan, devs, MODEL, WORK)
    assert "w1 has 24 GB" in why and "stage 1" in why and "optimizer 16.80" in why
    assert infeasible([StagePlacement(0, 3, (0,)), StagePlacement(3, 4, (1,))], devs, MODEL, WORK) == ""


def test_bad_plans_and_unknown_links_are_refused():
    devs = devices((1.0, 1.0, "a"), (1.0, 1.0, "c"))
    with pytest.raises(ValueError, match="contiguous"):
        predict_step([StagePlacement(0, 2, (0,)), StagePlacement(3, 4, (1,))], devs, NET, MODEL, WORK)
    with pytest.raises(ValueError, match="no link measured between sites 'a' and 'c'"):
        predict_step([StagePlacement(0, 2, (0,)), StagePlacement(2, 4, (1,))], devs, NET, MODEL, WORK)


def test_gptj_6b_shape_matches_the_published_parameter_count():
    gptj = ModelShape.gptj_6b()
    total = stage_params(gptj, 0, gptj.n_layer)
    assert total == pytest.approx(6.05e9, rel=0.01)  # GPT-J 6B: 6,053,381,344 parameters


def test_links_are_looked_up_per_site_pair_with_the_same_result_as_per_worker_pair():
    """transfer_s and allreduce_s read one link per pair of sites; the slowest link and the
    largest latency over every pair of workers are the same."""
    import random

    from coordinator.cost_model import allreduce_s, transfer_s

    net = Network({("a", "b"): Link(0.05, 1.0), ("a", "c"): Link(0.1, 0.3), ("b", "c"): Link(0.02, 2.0)},
                  inside=Link(0.001, 10.0))
    rng = random.Random(0)
    devs = [Device(f"w{i}", 100.0, 80.0, rng.choice("abc")) for i in range(12)]
    for _ in range(50):
        a, b = rng.sample(range(12), rng.randint(1, 5)), rng.sample(range(12), rng.randint(1, 5))
        x, y = StagePlacement(0, 2, tuple(a)), StagePlacement(2, 4, tuple(b))
        pairs = [net.link(devs[i], devs[j]) for i in a for j in b]
        nbytes = WORK.tokens_per_micro_batch * MODEL.d_model * WORK.activation_bytes_per_value
        want = max(p.latency_s for p in pairs) + nbytes * 8 / (min(p.gbps for p in pairs) * min(len(a), len(b)) * 1e9)
        assert transfer_s(MODEL, WORK, x, y, devs, net) == pytest.approx(want, rel=1e-12)
        ring = [net.link(devs[i], devs[j]) for k, i in enumerate(a) for j in a[k + 1:]]
        r, grad = len(a), stage_params(MODEL, 0, 2) * WORK.gradient_bytes_per_param
        want = 0.0 if r == 1 else (2 * (r - 1) / r * grad * 8 / (min(p.gbps for p in ring) * 1e9)
                                   + 2 * (r - 1) * max(p.latency_s for p in ring))
        assert allreduce_s(MODEL, WORK, x, devs, net) == pytest.approx(want, rel=1e-12)


def test_worst_links_are_the_worst_of_every_pair_and_a_missing_pair_is_named():
    """worst_between / worst_within walk the pairs themselves (the search calls them ~10^5 times):
    they must give what taking the worst over site_link of each pair gives, memoized or not."""
    import itertools
    import random

    rng = random.Random(0)
    sites = [f"s{i}" for i in range(7)]
    net = Network({(a, b): Link(rng.uniform(0.001, 0.2), rng.uniform(0.05, 10.0))
                   for a, b in itertools.combinations(sites, 2)}, inside=Link(0.002, 5.0))
    for _ in range(200):
        a = frozenset(rng.sample(sites, rng.randint(1, 4)))
        b = frozenset(rng.sample(sites, rng.randint(1, 4)))
        pairs = [net.site_link(x, y) for x in a for y in b]
        for _ in range(2):  # computed, then from the memo
            assert net.worst_between(a, b) == Link(max(p.latency_s for p in pairs), min(p.gbps for p in pairs))
        crowded = frozenset(rng.sample(sorted(a), rng.randint(0, len(a))))
        if len(a) < 2 and not crowded:
            continue
        within = [net.site_link(x, x) for x in crowded] + [net.site_link(x, y) for x, y in itertools.combinations(a, 2)]
        assert net.worst_within(a, crowded) == Link(max(p.latency_s for p in within), min(p.gbps for p in within))
    with pytest.raises(ValueError, match="no link measured between sites 'a' and 'elsewhere'"):
        NET.worst_between(frozenset({"a"}), frozenset({"elsewhere"}))
    with pytest.raises(ValueError, match="needs two members"):
        NET.worst_within(frozenset({"a"}), frozenset())
