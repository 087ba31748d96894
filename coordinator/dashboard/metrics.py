"""Prometheus metrics of the run and of each live worker, read from the status object."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PHASES = ("waiting", "open", "accumulated", "averaging", "applying", "done")
ALIVE = ("loading", "ready", "standby", "draining")
WORKER_STATES = (*ALIVE, "left", "dead", "quarantined")
# (metric name, help, key in worker.metrics, counter?)
_WORKER_METRICS = [
    ("micro_batches_per_second", "Micro-batches processed per second over the last heartbeat interval",
     "micro_batches_per_s", False),
    ("busy_ratio", "Share of wall time spent computing over the last heartbeat interval", "busy_fraction", False),
    ("downstream_mbit", "Measured throughput of the slowest downstream link (0: none measured)",
     "downstream_mbit", False),
    ("micro_batches", "Micro-batches processed since the worker started", "micro_batches", True),
    ("bytes_sent", "Stage-to-stage bytes sent since the worker started", "bytes_sent", True),
    ("bytes_received", "Stage-to-stage bytes received since the worker started", "bytes_received", True),
    ("averaging_bytes", "Bytes sent by this worker's averaging rounds since it started", "averaging_bytes", True),
    ("peak_memory_bytes", "Device memory torch's allocator held at its peak since the worker's stage was "
     "ready (CUDA; 0 on CPU)", "peak_memory_bytes", False),
]


class StatusCollector:
    """A prometheus_client collector over `get_status()` (the coordinator's status object)."""

    def __init__(self, get_status: Callable[[], dict]):
        self.get_status = get_status

    def collect(self) -> Iterator[Metric]:
        s = self.get_status()
        yield from self._run(s)
        yield from self._workers(s)

    def _run(self, s: dict) -> Iterator[Metric]:
        def gauge(name: str, doc: str, value) -> Iterator[Metric]:
            if value is not None:
                yield GaugeMetricFamily(f"gptjt_{name}", doc, value=float(value))

        yield from gauge("step", "Optimizer steps closed (the step being worked on, 0-based)", s["step"])
        yield from gauge("steps_target", "Optimizer steps of the run (train.steps)", s["steps_total"])
        yield CounterMetricFamily("gptjt_tokens", "Input tokens of the closed steps", value=s["tokens"])
        yield from gauge("tokens_target", "Input tokens the run will process", s["tokens_target"])
        yield from gauge("tokens_per_second", "Input tokens per second over the last 5 steps", s["tokens_per_s"])
        yield from gauge("loss", "Loss of the last closed step", s["loss"])
        yield from gauge("learning_rate", "Learning rate of the step being worked on", s["lr"])
        yield from gauge("eta_seconds", "Seconds until the run's token target at the current rate", s["eta_s"])
        yield from gauge("step_seconds", "Mean wall time of the last 5 steps", s["measured_step_s"])
        yield from gauge("predicted_step_seconds", "Step time the stage plan predicts",
                         (s.get("plan") or {}).get("predicted_step_s"))
        yield from gauge("paused", "1 while ticket issue is paused by the operator", int(s["paused"]))
        yield from gauge("step_attempt", "Attempt of the current step (bumps when a step restarts)", s["attempt"])
        yield from gauge("plan_version", "Version of the stage plan", s["plan_version"])
        yield from gauge("restore_epoch", "Times the stages had to (re)load their state", s["restore_epoch"])
        latest = s["checkpoints"]["latest_complete"]
        yield from gauge("checkpoint_latest_step", "Newest step the checkpoint store holds completely", latest)
        phase = GaugeMetricFamily("gptjt_phase", "1 for the step's current phase", labels=["phase"])
        for p in PHASES:
            phase.add_metric([p], float(s["phase"] == p))
        yield phase
        workers = GaugeMetricFamily("gptjt_workers", "Workers by state", labels=["state"])
        for state in WORKER_STATES:
            workers.add_metric([state], float(sum(w["state"] == state for w in s["workers"])))
        yield workers
        t = s["tickets"]
        tickets = GaugeMetricFamily("gptjt_tickets", "Micro-batch tickets by state", labels=["state"])
        for state in ("pending", "leased", "committed", "aborted", "rolled_back"):
            tickets.add_metric([state], float(t[state]))
        yield tickets
        yield CounterMetricFamily("gptjt_tickets_issued", "Ticket leases handed out", value=t["issued"])
        yield CounterMetricFamily("gptjt_tickets_reissued", "Tickets put back for re-issue", value=t["reissued"])
        yield from gauge("exactly_once_violations", "Closed steps that did not count each micro-batch once",
                         len(t["exactly_once_violations"]))
        checks = CounterMetricFamily("gptjt_verification", "Checks of stage work over the run, by what they counted "
                                     "(commitments kept, chain checks and mismatches, spot checks by verdict)",
                                     labels=["what"])
        verification = dict(s["verification"])
        quarantined, fraction = verification.pop("quarantined", None), verification.pop("spot_verified_fraction", None)
        for what, n in sorted(verification.items()):
            checks.add_metric([what], n)
        yield checks
        yield from gauge("quarantined_workers", "Workers quarantined now (out-voted by two spot checks)", quarantined)
        yield from gauge("verified_fraction", "Share of the closed steps' stage work (tokens x stages) a spot check "
                         "recomputed and agreed with", fraction)
        events = CounterMetricFamily("gptjt_events", "Events recorded in the ledger, by kind", labels=["kind"])
        for kind, n in sorted(s["event_counts"].items()):
            events.add_metric([kind], n)
        yield events

    def _workers(self, s: dict) -> Iterator[Metric]:
        labels = ["worker", "name", "stage"]
        live = [w for w in s["workers"] if w["state"] in ALIVE]
        info = GaugeMetricFamily("gptjt_worker_info", "1 per live worker; its state and device as labels",
                                 labels=[*labels, "state", "device"])
        heartbeat = GaugeMetricFamily("gptjt_worker_heartbeat_age_seconds", "Seconds since the last heartbeat",
                                      labels=labels)
        tickets = CounterMetricFamily("gptjt_worker_tickets_done", "Tickets this worker committed", labels=labels)
        straggler = GaugeMetricFamily("gptjt_worker_straggler", "1 for the worker that bounds the pipeline",
                                      labels=labels)
        families = {key: (CounterMetricFamily if counter else GaugeMetricFamily)(f"gptjt_worker_{name}", doc,
                                                                                 labels=labels)
                    for name, doc, key, counter in _WORKER_METRICS}
        for w in live:
            ids = [w["id"], w["name"] or "", str(w["stage"])]
            device = w["device"].get("name") or w["device"].get("kind") or ""
            info.add_metric([*ids, w["state"], device], 1.0)
            heartbeat.add_metric(ids, w["last_heartbeat_s"])
            tickets.add_metric(ids, w["tickets_done"])
            straggler.add_metric(ids, float(w["id"] == s["straggler"]))
            for key, family in families.items():
                family.add_metric(ids, float(w["metrics"].get(key) or 0))
        yield from (info, heartbeat, tickets, straggler, *families.values())


def render_metrics(get_status: Callable[[], dict]) -> bytes:
    """The Prometheus text exposition of the current status."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(get_status))
    return generate_latest(registry)
