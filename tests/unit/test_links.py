"""Link emulation arithmetic and the per-link codec choice (no network)."""

import asyncio

import pytest

from gptjt_core.config import LinkConfig, PipelineConfig
from worker.link_codecs import HYSTERESIS, LinkCodecChooser
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


def test_without_adaptive_codecs_the_defaults_stay_and_nonsense_is_ignored():
    c = LinkCodecChooser(PipelineConfig(activation_codec="q8", gradient_codec="fp16"),
                         LinkConfig(adaptive_codecs=False, slow_link_mbit=100.0))
    c.observe("a:1", 1000, 1.0)  # 8 kbit/s
    assert c.codecs("a:1") == ("q8", "fp16")
    c.observe("a:1", 0, 1.0)
    c.observe("a:1", 1000, -0.5)  # compute time above wall time (clock noise): no measurement
    assert c.links["a:1"].mbit == pytest.approx(0.008)


def test_link_config_refuses_bad_values():
    from gptjt_core.config import ConfigError

    with pytest.raises(ConfigError, match="slow_activation_codec"):
        LinkConfig(slow_activation_codec="zip")
    with pytest.raises(ConfigError, match="emulate_mbit"):
        LinkConfig(emulate_mbit=-5)
