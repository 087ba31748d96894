"""Sites found from measured latencies, so that a few measured links stand in for the many not.

The scheduler sees only the links workers measured for it (a request names up to 8 at a time,
worker/link_probe.py), and a plan over 64 candidates needs ~2,000 pairs: most are unmeasured
for a long while, and an unmeasured pair used to take scheduler.default_link_* (1 Gbit/s, 5 ms),
which made far-apart volunteers look close. Volunteers cluster in regions, and two workers a
few milliseconds apart share their links to everyone else. So:
- workers whose measured one-way latency is at most scheduler.site_latency_ms are one site
  (single linkage: a chain of close pairs is one site);
- a pair nobody measured takes the typical measured link between the two sites: the median
  latency and the median bandwidth of the pairs measured between them (inside one site: of
  the pairs measured inside it), and only with none the configured default.
A measured pair always keeps its own figure. Pure: no I/O, no clock.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from .cost_model import Link


def find_sites(ids: Iterable[str], measured: dict[tuple[str, str], Link], site_latency_ms: float) -> dict[str, str]:
    """worker id -> its site's name (the smallest id in it). `measured`: (a, b) with a < b -> link."""
    parent = {i: i for i in ids}

    def root(i: str) -> str:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    if site_latency_ms > 0:
        for (a, b), link in measured.items():
            if a in parent and b in parent and link.latency_s * 1e3 <= site_latency_ms:
                ra, rb = root(a), root(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    return {i: root(i) for i in parent}


def typical_links(sites: dict[str, str], measured: dict[tuple[str, str], Link]) -> dict[tuple[str, str], Link]:
    """(site, site) with the first <= the second -> the median measured link between them."""
    by_pair: dict[tuple[str, str], list[Link]] = {}
    for (a, b), link in measured.items():
        sa, sb = sites.get(a), sites.get(b)
        if sa is not None and sb is not None:
            by_pair.setdefault((sa, sb) if sa <= sb else (sb, sa), []).append(link)
    return {pair: Link(statistics.median(x.latency_s for x in links), statistics.median(x.gbps for x in links))
            for pair, links in by_pair.items()}


@dataclass(frozen=True)
class SiteMap:
    """Sites and their typical links, found once from one set of measured pairs and used for every
    network built on them: a plan decision builds several (each candidate set, the plan in force,
    pending proposals), and at 1,000 workers finding sites and medians over ~10^4 measured pairs
    each time took ~13 % of the coordinator's CPU in bench churn."""
    sites: dict[str, str]  # worker id -> its site's name (the smallest id in it)
    typical: dict[tuple[str, str], Link]  # (site, site), the first <= the second -> median measured link

    @classmethod
    def find(cls, ids: Iterable[str], measured: dict[tuple[str, str], Link], site_latency_ms: float) -> SiteMap:
        """Sites of `ids` and of every worker in `measured` (a worker on standby measured towards
        a region's workers all the same: its pairs find sites and typical links too)."""
        sites = find_sites({*ids, *(w for pair in measured for w in pair)}, measured, site_latency_ms)
        return cls(sites, typical_links(sites, measured))


def fill_links(ids: list[str], measured: dict[tuple[str, str], Link], site_latency_ms: float,
               default: Link, site_map: SiteMap | None = None) -> dict[tuple[str, str], Link]:
    """Every pair (a, b) of `ids` (in their order, a before b) -> its measured link, else its sites'
    typical link, else `default`. `measured` may hold pairs of other workers too. site_map: the
    sites found once for these measurements (SiteMap.find); None finds them here. A worker it does
    not know is a site of its own."""
    if site_map is None:
        site_map = SiteMap.find(ids, measured, site_latency_ms)
    sites, typical = site_map.sites, site_map.typical
    out = {}
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            key = (a, b) if a < b else (b, a)
            found = measured.get(key)
            if found is None:
                sa, sb = sites.get(a, a), sites.get(b, b)
                found = typical.get((sa, sb) if sa <= sb else (sb, sa), default)
            out[(a, b)] = found
    return out
