"""Coordinator-only settings: where it listens and keeps its ledger, and how it places stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config_errors import _check


@dataclass
class CoordinatorConfig:
    """Where the coordinator listens and keeps its ledger; liveness timing."""

    listen: str = "127.0.0.1:7420"
    """host:port for the gRPC API (port 0 picks a free one); must contain ':'."""
    state_path: str = "gptjt-run.db"
    """SQLite ledger (WAL); relative paths are relative to the run config file. With ledger_url
    the ledger lives in PostgreSQL, and state_path only names where the run's keys are kept
    (STATE.ca.pem, STATE.admin-token, ...)."""
    ledger_url: str = ""
    """'' (the default): the ledger is the SQLite file at state_path. A postgresql:// URL (libpq
    form; the password from PGPASSWORD or ~/.pgpass rather than the URL): the ledger lives in
    that database, and a second coordinator started on the same URL stands by. One leads (a
    PostgreSQL advisory lock held by its connection); the other answers every call with
    UNAVAILABLE and takes over within standby_poll_s of the leader's death or loss of its
    database connection. Workers are given both addresses (gptjt-worker --join A,B). Both
    coordinators must see the same state_path directory (the run's CA and tokens) and the
    same checkpoint store (a shared path or an fsspec URL)."""
    standby_poll_s: float = 0.5
    """Seconds between a standby coordinator's tries to take the leadership lock, > 0."""
    heartbeat_interval_s: float = 2.0
    """Seconds between a worker's heartbeats, > 0; workers learn it from the join reply."""
    heartbeat_timeout_s: float = 10.0
    """A worker silent this long is dead: its tickets are re-issued (PRIME uses 2 s / 10 s).
    Seconds, more than 2 x heartbeat_interval_s."""
    phase_timeout_s: float = 900.0
    """A step phase that makes no progress for this many seconds is stuck (coordinator/liveness.py):
    OPEN with no commit, or ACCUMULATED / APPLYING with a member that never reports. The
    coordinator then restarts the step or drops the silent members, with an event naming them.
    APPLYING includes the checkpoint upload (about 73 GB a step for GPT-J 6B): keep it above that.
    Seconds, more than heartbeat_timeout_s."""
    read_access: str = "open"
    """Who may read the run's status (Status, Events; worker calls always need a session): "open",
    or "token": only callers presenting the run's read token (STATE.read-token beside the
    ledger, or $GPTJT_READ_TOKEN of the coordinator) or the admin token."""
    joins_per_s: float = 1.0
    """Sustained rate of joins one join token may make, per second > 0 (a refused join gets
    RESOURCE_EXHAUSTED): join spam cannot grow the workers table faster than this."""
    join_burst: int = 128
    """Joins one token may make at once after a quiet spell (a fleet starting together), >= 1."""
    prune_after_s: float = 3600.0
    """Workers that left or died this many seconds ago are deleted from the ledger (their ids stay
    in its history); seconds > 0."""
    max_events: int = 200_000
    """Events kept in the ledger, newest first (older ones are deleted, their counts by kind
    kept); an integer >= 1000."""
    max_stall_restarts: int = 3
    """Times an OPEN step with no progress is restarted before the workers holding its stalled
    leases are dropped instead. An integer >= 0."""
    tls_cert: str = ""
    """PEM certificate chain; with tls_key, the API is served over TLS. '' (with tls_key '') serves
    plain gRPC."""
    tls_key: str = ""
    """PEM private key of tls_cert; set together with tls_cert (or neither)."""
    checkpoint_store: str = ""
    """Where stage checkpoints go: a directory on the coordinator host (workers stream them
    through the coordinator API, which writes them to disk chunk by chunk), or an fsspec URL
    that workers and coordinator can both reach, e.g. s3://bucket/run or file:///mnt/shared/run:
    then each stage's writer puts its file there itself and the coordinator records only its
    path, size and SHA-256 (checked whenever the file is read); credentials come from each
    machine's environment. '' (the default): a 'checkpoints' directory beside state_path."""
    keep_checkpoints: int = 0
    """Complete checkpoints to keep in the store, newest first (0: keep every one). Once a step
    is complete, the files of steps older than the oldest kept one are deleted: at GPT-J 6B (fp32
    weights and AdamW moments) a step's checkpoint is about 73 GB. The step the run last
    restored from is kept while any stage worker has yet to load it. An integer >= 0."""
    resume_from_store: bool = False
    """A NEW ledger starts from the store's latest complete checkpoint (e.g. after losing the
    ledger, or to continue with a different number of stages: the store re-slices by layer).
    false: a new ledger starts from model.source."""
    dashboard_host: str = "127.0.0.1"
    """Address the dashboard binds, apart from the gRPC listen host: loopback by default, so its
    admin token never crosses a network unless asked to (reach it over SSH, or bind another
    address). With tls_cert/tls_key it serves HTTPS with that certificate; a non-loopback address
    without them is served, with a loud warning at start (the admin token would travel in clear,
    unless TLS is terminated in front). "0.0.0.0" or "::" for every interface."""
    relay_listen: str = ""
    """host:port of a relay for workers behind NAT that cannot accept connections (they run
    gptjt-worker --relay HOST:PORT and serve their stage through it; mutual TLS runs end to
    end, the relay splices ciphertext). Every relayed byte crosses this host's link: put it
    where bandwidth is cheap. '' (the default): none. Port 0: any free one, printed at start."""
    dashboard_port: int = 0
    """HTTP dashboard, JSON API and Prometheus /metrics on dashboard_host: 0 = any free port
    (printed at start), -1 = none; otherwise a port up to 65535. Read-only without the admin token."""

    @property
    def store_root(self) -> str:
        return self.checkpoint_store or str(Path(self.state_path).parent / "checkpoints")

    def __post_init__(self) -> None:
        _check(":" in self.listen, "listen", self.listen, "host:port")
        _check(not self.ledger_url or self.ledger_url.startswith(("postgresql://", "postgres://")), "ledger_url",
               self.ledger_url, "'' (SQLite at state_path) or a postgresql://user@host/database URL")
        _check(self.standby_poll_s > 0, "standby_poll_s", self.standby_poll_s, "seconds > 0")
        _check(not self.relay_listen or self.relay_listen.rpartition(":")[2].isdigit(), "relay_listen",
               self.relay_listen, "host:port, or '' for no relay")
        _check(self.heartbeat_interval_s > 0, "heartbeat_interval_s", self.heartbeat_interval_s, "> 0")
        _check(self.heartbeat_timeout_s > 2 * self.heartbeat_interval_s, "heartbeat_timeout_s",
               self.heartbeat_timeout_s, f"more than two heartbeat intervals ({2 * self.heartbeat_interval_s})")
        _check(self.phase_timeout_s > self.heartbeat_timeout_s, "phase_timeout_s", self.phase_timeout_s,
               f"more than heartbeat_timeout_s ({self.heartbeat_timeout_s}): a silent worker is dead first")
        _check(self.prune_after_s > 0, "prune_after_s", self.prune_after_s, "seconds > 0")
        _check(isinstance(self.max_events, int) and self.max_events >= 1000, "max_events", self.max_events,
               "an integer >= 1000")
        _check(self.joins_per_s > 0, "joins_per_s", self.joins_per_s, "a rate per second > 0")
        _check(isinstance(self.join_burst, int) and self.join_burst >= 1, "join_burst", self.join_burst,
               "an integer >= 1")
        _check(self.read_access in ("open", "token"), "read_access", self.read_access, "'open' or 'token'")
        _check(isinstance(self.max_stall_restarts, int) and self.max_stall_restarts >= 0, "max_stall_restarts",
               self.max_stall_restarts, "an integer >= 0")
        _check(bool(self.tls_cert) == bool(self.tls_key), "tls_cert", self.tls_cert,
               "set together with tls_key (or neither)")
        _check(isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 0, "keep_checkpoints",
               self.keep_checkpoints, "an integer >= 0 (0 keeps every checkpoint)")
        _check(bool(self.dashboard_host.strip("[]")), "dashboard_host", self.dashboard_host,
               "an address to bind, e.g. \"127.0.0.1\" (loopback), \"0.0.0.0\" or \"::\"")
        _check(-1 <= self.dashboard_port <= 65535, "dashboard_port", self.dashboard_port,
               "a port (0 = any free one, -1 = no dashboard)")


@dataclass
class SchedulerConfig:
    """How the coordinator places stages: layer ranges, replica groups and pipeline order from
    each worker's measured device and links (coordinator/scheduler.py), re-planned on joins,
    leaves and new measurements."""

    placement: str = "cost-model"
    """'cost-model': layer ranges and groups that minimise the predicted step time; 'even':
    balanced layer counts, workers in join order (the cost model only predicts). Nothing else."""
    min_workers: int = 0
    """The first step waits until this many workers have joined and reported a measurement at
    the run's dtype, so the first plan sees them all (0: start as soon as every stage has one).
    An integer >= 0."""
    horizon_steps: int = 50
    """Hysteresis: a re-plan moves workers only if its predicted saving over this many steps
    exceeds the stall the moves cause: layer_load_s per layer, for the most layers one worker must
    load (workers load in parallel). Once the first step has opened, the steps the run has left
    cap it, and the reload the last checkpoint re-plan was measured to cost is added
    (coordinator/ledger/replan_stall.py). An integer >= 1."""
    layer_load_s: float = 2.0
    """Seconds a worker needs to load one layer it does not hold (weights + optimizer state), >= 0."""
    search_evaluations: int = 1200
    """Candidate layouts one plan search may score (coordinator/placement.py), an integer >= 0. The
    count, not the clock, ends the search, so the same workers and links give the same plan however
    loaded the coordinator is; 0.3-0.7 s of CPU a search for 64 workers (bench/README.md). Below
    ~800, searches for small swarms stop short of the optimum (bench scheduler's gap_vs_optimal)."""
    search_budget_s: float = 2.0
    """Wall-clock backstop of one plan search, seconds >= 0 (it runs on the coordinator's event
    loop, so it stays well under the heartbeat timeout): only for pathological inputs, it should
    never bind at the defaults (when it does, the plan depends on the machine's speed)."""
    default_link_mbit: float = 1000.0
    """Assumed bandwidth of a worker pair whose link nobody has measured yet, Mbit/s > 0."""
    default_link_latency_ms: float = 5.0
    """Assumed one-way latency of an unmeasured link, milliseconds >= 0."""
    site_latency_ms: float = 8.0
    """Workers whose measured one-way latency is at most this many milliseconds (>= 0) are one
    site: a link nobody measured between two workers takes the typical measured link between
    their sites (the median of the measured pairs), not default_link_*. 8 ms: above a region's
    inside (DT-FM measured 5 ms), below the nearest two regions (11 ms). 0: each worker is its own
    site."""
    probe_max_age_s: float = 600.0
    """A link measurement older than this many seconds (> 0) is measured again when a plan needs
    that link."""
    replan_every_s: float = 0.0
    """Fewest seconds (>= 0) between two plan searches. Joins, deaths and measurements that come
    sooner are merged into one search the coordinator's reaper runs when the time has come (a
    stage left empty still takes a standby worker whose memory holds that stage at once).
    0: each searches at once. bench churn runs 1,000 volunteers with 30 s (deploy/README.md,
    "Size")."""
    replan_every_running_s: float = 0.0
    """The same once the run's first step has opened (>= 0; 0: replan_every_s throughout). From
    then on a plan that moves a worker waits for a checkpoint, where a fresh search decides what
    applies (a stage left empty is still filled at once): a search in between only finds whether
    a better plan is worth that restore, so it can run less often than during start-up, when
    every search can apply. bench churn: 60 s."""

    def __post_init__(self) -> None:
        _check(self.placement in ("cost-model", "even"), "placement", self.placement, "'cost-model' or 'even'")
        _check(self.min_workers >= 0, "min_workers", self.min_workers, "an integer >= 0")
        _check(self.horizon_steps >= 1, "horizon_steps", self.horizon_steps, "an integer >= 1")
        _check(isinstance(self.search_evaluations, int) and self.search_evaluations >= 0, "search_evaluations",
               self.search_evaluations, "an integer >= 0")
        for name in ("layer_load_s", "search_budget_s", "default_link_latency_ms"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "a number >= 0")
        _check(self.default_link_mbit > 0, "default_link_mbit", self.default_link_mbit, "a number of Mbit/s > 0")
        _check(self.site_latency_ms >= 0, "site_latency_ms", self.site_latency_ms, "milliseconds >= 0")
        _check(self.probe_max_age_s > 0, "probe_max_age_s", self.probe_max_age_s, "seconds > 0")
        _check(self.replan_every_s >= 0, "replan_every_s", self.replan_every_s, "seconds >= 0")
        _check(self.replan_every_running_s >= 0, "replan_every_running_s", self.replan_every_running_s,
               "seconds >= 0")
