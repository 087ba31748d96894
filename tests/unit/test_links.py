"""Link emulation arithmetic and the per-link codec choice (no network)."""

import asyncio

import pytest

from gptjt_core.config import LinkConfig, PipelineConfig
from worker.link_codecs import HYSTERESIS, PROBED_KEPT, LinkCodecChooser
from worker.link_probe import MAX_PROBE_BYTES, PROBE_BYTES, LinkProber, bandwidth_is_a_lower_bound, link_mbit
from worker.link_shaper import LinkShaper


def _schedule(shaper: LinkShaper, sizes: list[int], start: float) -> list[float]:
    async def go():
        return shaper.schedule(sizes, start=start)
    return asyncio.run(go())


def test_a_shaped_link_serialises_bytes_then_adds_latency():
    link = LinkShaper(mbit=8.0, latency_ms=30.0)  # 1 MB/s: 1000 bytes take 1 ms
    first = _schedule(link, [1000, 3000], start=10.0)
    assert first == pytest.approx([10.001 + 0.030, 10.004 + 0.030])
    # A message queued while the line is busy waits for it (FIFO), then pays its own latency.
    second = _schedule(link, [2000], start=10.002)
    assert second == pytest.approx([10.006 + 0.030])
    # An idle line starts at the hand-over time.
    assert _schedule(link, [1000], start=20.0) == pytest.approx([20.031])
    assert link.bytes == 7000


def test_latency_only_and_bad_settings():
    assert _schedule(LinkShaper(0.0, 5.0), [10**9], start=1.0) == pytest.approx([1.005])
    with pytest.raises(ValueError, match="mbit >= 0"):
        LinkShaper(-1.0, 0.0)


def test_deliver_waits_for_the_arrival():
    async def go():
        link = LinkShaper(mbit=80.0, latency_ms=20.0)  # 100 kB: 10 ms on the line
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await link.deliver(100_000)
        return loop.time() - t0
    assert asyncio.run(go()) >= 0.029


def _chooser(**link) -> LinkCodecChooser:
    return LinkCodecChooser(PipelineConfig(activation_codec="fp16", gradient_codec="fp16"),
                            LinkConfig(adaptive_codecs=True, slow_link_mbit=100.0, slow_activation_codec="q4",
                                       slow_gradient_codec="q3", **link))


def test_a_slow_link_gets_fewer_bits_and_a_fast_one_gets_them_back():
    c = _chooser()
    assert c.codecs("a:1") == ("fp16", "fp16")  # unmeasured: the run's defaults
    c.observe("a:1", 1_000_000, 0.2)  # 40 Mbit/s
    assert c.codecs("a:1") == ("q4", "q3")
    assert c.metrics() == {"downstream_mbit": pytest.approx(40.0), "activation_codec": "q4", "gradient_codec": "q3"}
    c.observe("b:2", 1_000_000, 0.01)  # 800 Mbit/s: another link stays on the defaults
    assert c.codecs("b:2") == ("fp16", "fp16")
    # Just above the threshold is not enough to switch back (hysteresis) ...
    c.links["a:1"].mbit = 100.0 * (HYSTERESIS - 0.05)
    c.observe("a:1", 1_000_000, 8 / (100.0 * (HYSTERESIS - 0.05)))
    assert c.codecs("a:1") == ("q4", "q3")
    # ... well above it is.
    for _ in range(10):
        c.observe("a:1", 1_000_000, 0.01)
    assert c.codecs("a:1") == ("fp16", "fp16")
    c.forget_except(["b:2"])
    assert set(c.links) == {"b:2"}


def test_a_link_the_probe_found_slow_starts_on_the_slow_codecs_until_calls_measure_it():
    c = _chooser()
    c.forget_except(["a:1"])  # the plan: a:1 is the next stage
    c.probe_measured("a:1", 40.0)  # under the 100 Mbit/s threshold: slow before any call
    c.probe_measured("b:2", 900.0)
    assert c.codecs("a:1") == ("q4", "q3") and c.codecs("b:2") == ("fp16", "fp16")
    assert c.metrics() == {"downstream_mbit": 40.0, "activation_codec": "q4", "gradient_codec": "q3"}
    # A new plan keeps the probe's figures (a probe comes before the plan that uses its link).
    c.forget_except(["b:2"])
    assert c.codecs("a:1") == ("q4", "q3")
    assert c.metrics()["downstream_mbit"] == 900.0
    # The first call replaces the probe's figure; a link judged slow needs the hysteresis to be fast.
    c.observe("a:1", 1_000_000, 8 / (100.0 * (HYSTERESIS - 0.05)))
    assert c.links["a:1"].mbit == pytest.approx(100.0 * (HYSTERESIS - 0.05)) and c.codecs("a:1") == ("q4", "q3")
    c.observe("b:2", 1_000_000, 0.2)  # 40 Mbit/s by the call, whatever the probe said
    assert c.codecs("b:2") == ("q4", "q3")
    # A later probe does not overrule calls.
    c.probe_measured("b:2", 900.0)
    assert c.codecs("b:2") == ("q4", "q3")


def test_probe_figures_are_bounded_and_nonsense_is_ignored():
    c = _chooser()
    c.probe_measured("x:0", 0.0)
    c.probe_measured("x:0", float("nan"))
    assert c.probed == {}
    for i in range(PROBED_KEPT + 5):
        c.probe_measured(f"h:{i}", 10.0)
    assert len(c.probed) == PROBED_KEPT and "h:0" not in c.probed and f"h:{PROBED_KEPT + 4}" in c.probed
    c.probe_measured("h:5", 10.0)  # measured again: the newest
    assert list(c.probed)[-1] == "h:5"


class FakeLinks:
    """Probe round trips over links of a given bandwidth and round trip: (rtt, rtt + payload's bits / rate)."""

    def __init__(self, links: dict[str, tuple[float, float]]):  # address -> (Mbit/s, round trip in s)
        self.links, self.payloads = links, []

    async def probe(self, address, payload_bytes):
        mbit, rtt = self.links[address]
        self.payloads.append(payload_bytes)
        return rtt, rtt + payload_bytes * 8 / (mbit * 1e6)


def test_a_probe_grows_until_the_bandwidth_shows_and_only_measured_figures_reach_the_chooser():
    """A payload's extra time within round-trip noise gives only a lower bound: 256 KiB over a
    1 Gbit/s link 100 ms away reads "at least 82 Mbit/s". The probe grows its payload 4x at a
    time up to MAX_PROBE_BYTES until the bandwidth shows; what is still only a bound there goes
    to the coordinator (as before) but not to the codec chooser."""
    assert bandwidth_is_a_lower_bound(rtt_s=0.100, transfer_s=0.102)
    assert link_mbit(0.100, 0.102) == pytest.approx(PROBE_BYTES * 8 / (0.25 * 0.102) / 1e6)  # ~82
    assert not bandwidth_is_a_lower_bound(rtt_s=0.030, transfer_s=0.051)

    links = FakeLinks({"slow:1": (100.0, 0.030), "far:2": (1000.0, 0.100), "fat:3": (10_000.0, 0.100)})
    seen = []
    prober = LinkProber(links, max_age_s=60, on_bandwidth=lambda address, mbit: seen.append((address, mbit)))
    _measure(prober, ["slow:1"])
    assert links.payloads == [PROBE_BYTES] * 2 and seen == [("slow:1", pytest.approx(100.0))]
    links.payloads.clear()
    _measure(prober, ["far:2", "fat:3"])
    assert links.payloads == [PROBE_BYTES] * 2 + [4 * PROBE_BYTES] * 2 + [MAX_PROBE_BYTES] * 2 + [
        PROBE_BYTES] * 2 + [4 * PROBE_BYTES] * 2 + [MAX_PROBE_BYTES] * 2
    assert MAX_PROBE_BYTES == 16 * PROBE_BYTES
    reported = {r["address"]: r["mbit"] for r in prober.take()}
    assert reported["slow:1"] == pytest.approx(100.0) and reported["far:2"] == pytest.approx(1000.0)
    assert reported["fat:3"] == pytest.approx(MAX_PROBE_BYTES * 8 / (0.25 * (0.100 + MAX_PROBE_BYTES * 8 / 1e10)) / 1e6)
    assert 1200 < reported["fat:3"] < 10_000  # at least ~1.3 Gbit/s: a bound, sent to the coordinator ...
    assert [a for a, _ in seen] == ["slow:1", "far:2"]  # ... not to the codec chooser


def test_a_connection_opened_by_the_first_round_trip_does_not_inflate_the_bandwidth():
    """The first empty round trip on a new channel also opens the connection: 47 ms more here, over
    a 20 Mbit/s link with 10 ms round trips. Paired with its own payload trip (which happened to
    be the faster one) it read 36 Mbit/s; the best empty and the best payload trip read 20."""
    class Opening:
        trips = iter([(0.057, 0.1148), (0.010, 0.1150)])

        async def probe(self, address, payload_bytes):
            return next(self.trips)

    seen = []
    prober = LinkProber(Opening(), max_age_s=60, on_bandwidth=lambda address, mbit: seen.append(mbit))
    _measure(prober, ["b:1"])
    assert seen == [pytest.approx(PROBE_BYTES * 8 / (0.1148 - 0.010) / 1e6)] and 19.9 < seen[0] < 20.1


def _measure(prober: LinkProber, addresses: list[str]) -> None:
    async def go():
        prober.request(addresses)
        if prober._task is not None:
            await prober._task
    asyncio.run(go())


def test_a_failed_probe_is_tried_again_while_the_coordinator_asks_for_it(monkeypatch):
    """A peer whose server is still starting refuses the first probe; no new RunState may come
    to ask again (a paused run), so the prober tries again by itself, and stops once nobody asks."""
    import grpc

    from worker import link_probe

    monkeypatch.setattr(link_probe, "RETRY_S", 0.0)

    class Client:
        calls = 0

        async def probe(self, address, payload_bytes):
            Client.calls += 1
            if Client.calls <= 3:
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           "failed to connect")
            return 0.030, 0.051

    prober = LinkProber(Client(), max_age_s=60)
    _measure(prober, ["b:1"])
    assert Client.calls == 3 + 2 and [r["address"] for r in prober.take()] == ["b:1"]  # then 2 probe repeats
    _measure(prober, ["b:1"])  # measured within max_age_s: not again
    assert Client.calls == 5

    class Gone:
        calls = 0

        async def probe(self, address, payload_bytes):
            Gone.calls += 1
            prober.request([])  # the coordinator stops asking (a newer RunState)
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")

    prober = LinkProber(Gone(), max_age_s=60)
    _measure(prober, ["c:1"])
    assert Gone.calls == 1 and prober.take() == []


def test_without_adaptive_codecs_the_defaults_stay_and_nonsense_is_ignored():
    c = LinkCodecChooser(PipelineConfig(activation_codec="q8", gradient_codec="fp16"),
                         LinkConfig(adaptive_codecs=False, slow_link_mbit=100.0))
    c.observe("a:1", 1000, 1.0)  # 8 kbit/s
    assert c.codecs("a:1") == ("q8", "fp16")
    c.observe("a:1", 0, 1.0)
    c.observe("a:1", 1000, -0.5)  # compute time above wall time (clock noise): no measurement
    assert c.links["a:1"].mbit == pytest.approx(0.008)
    c.probe_measured("b:2", 0.008)
    assert c.codecs("b:2") == ("q8", "fp16")


def test_link_config_refuses_bad_values():
    from gptjt_core.config import ConfigError

    with pytest.raises(ConfigError, match="slow_activation_codec"):
        LinkConfig(slow_activation_codec="zip")
    with pytest.raises(ConfigError, match="emulate_mbit"):
        LinkConfig(emulate_mbit=-5)
