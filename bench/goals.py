"""The figures the READMEs show: what each compares against, its goal, and whether it is measured or predicted."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

OPS = {">=": (operator.ge, "≥"), "<=": (operator.le, "≤"), ">": (operator.gt, ">"), "<": (operator.lt, "<"),
       "==": (operator.eq, "=")}


@dataclass(frozen=True)
class Goal:
    """value OP target. target is a number or bool, or the name of another figure of the same
    benchmark (e.g. runs_completed == "runs_attempted")."""

    op: str
    target: float | bool | str
    source: str  # where the goal was set, e.g. "issue 5"

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"goal op {self.op!r}: use one of {sorted(OPS)}")

    def text(self) -> str:
        target = self.target
        if isinstance(target, bool):
            target = str(target).lower()
        elif isinstance(target, str):
            target = f"`{target}`"
        return f"{OPS[self.op][1]} {target} ({self.source})"

    def met(self, value, figures: dict) -> bool:
        """Whether `value` meets the goal; a missing or non-finite value does not."""
        target = lookup(figures, self.target) if isinstance(self.target, str) else self.target
        if value is None or target is None:
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return bool(OPS[self.op][0](value, target))


@dataclass(frozen=True)
class Figure:
    """One row: `key` is a dotted path into the benchmark's figures dict."""

    bench: str
    key: str
    what: str
    against: str = "—"
    goal: Goal | None = None
    predicted: bool = False  # from a cost model or formula, not a run
    headline: bool = False  # also in README.md's table
    published: str = ""  # external figures (other projects' papers), labelled as such where shown
    # a figure the benchmark reports its own verdict on: None there means the run cannot show the
    # goal either way (e.g. a "ceiling" that came out below the figure), rendered "not shown"
    verdict_key: str = ""


MISSING = object()  # a key the benchmark did not report (a catalogue out of step with its benchmark)


def lookup(figures: dict, key: str, default=None):
    """figures["a"]["b"] for "a.b" (a number indexes a list: "points.3.x"); `default` where a part is missing."""
    value = figures
    for part in key.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return default
    return value


def status(figure: Figure, entry: dict | None) -> str:
    """'met', 'missed', 'not shown' (the benchmark says its run cannot tell), 'no goal', or why
    there is no value: 'not measured', 'skipped', 'failed',
    'not in the results' (the benchmark ran but did not report this figure)."""
    if entry is None:
        return "not measured"
    if "skipped" in entry:
        return "skipped"
    if "failed" in entry:
        return "failed"
    value = lookup(entry["figures"], figure.key, MISSING)
    if value is MISSING:
        return "not in the results"
    if figure.goal is None:
        return "no goal"
    if figure.verdict_key and lookup(entry["figures"], figure.verdict_key, MISSING) is None:
        return "not shown"
    return "met" if figure.goal.met(value, entry["figures"]) else "missed"


def _g(op: str, target, source: str) -> Goal:
    return Goal(op, target, source)


FIGURES: tuple[Figure, ...] = (
    Figure("local", "tokens_per_s", "train-local tokens/s, tiny flavour, one process"),
    Figure("local", "stage_parity_max_abs_err", "2 chained stages vs the whole model, max abs error (fp32)",
           "transformers' `GPTJForCausalLM`"),
    Figure("swarm", "swarm_vs_local_tokens_per_s", "swarm (coordinator + 2 workers) over train-local tokens/s",
           "train-local in the same invocation with the swarm's threads in total (`local_threads`)", _g(">=", 0.9, "bench/README"), headline=True,
           published="OpenDiLoCo 90-95 %, INTELLECT-1 83-96 % utilization"),
    Figure("swarm", "pipeline_bound_vs_local",
           "a perfect pipeline of the swarm's stages (each timed alone, 1 thread; free links) over train-local",
           "train-local tokens/s in the same invocation", predicted=True),
    Figure("swarm", "swarm_vs_ideal_pipeline",
           "swarm tokens/s over a perfect pipeline of its own stages (each timed alone; free links, no protocol)",
           "`ideal_pipeline_step_s`: the stages' `stage_s` through `micro_batches_per_step` (GPipe's bound)",
           headline=True),
    Figure("swarm", "swarm_tokens_per_s", "swarm tokens/s (median step)"),
    Figure("swarm", "local_tokens_per_s", "train-local tokens/s in the same invocation"),
    Figure("swarm", "same_losses", "swarm step losses equal train-local's (relative difference < 1e-4)",
           "train-local's losses",
           _g("==", True, "bench/README")),
    Figure("swarm", "coordinator_heartbeat_p99_ms", "heartbeat p99 (ms), 500 simulated workers every 2 s",
           goal=_g("<", 50, "bench/README")),
    Figure("swarm", "auth_overhead_pct", "tokens/s cost of mutual TLS on stage links (%)",
           "the same run with `link.tls = \"off\"`", _g("<=", 3, "issue 15"), headline=True,
           published="hivemind, Petals, SWARM: libp2p encryption, cost not published"),
    Figure("recovery", "recovery_s", "seconds from SIGKILL of a replica to the next closed step",
           "a 10 s heartbeat timeout (PRIME)", _g("<=", 5, "bench/README"), headline=True,
           published="PRIME / INTELLECT-1: 2 s heartbeat, 10 s timeout"),
    Figure("recovery", "tickets_lost", "micro-batches lost", goal=_g("==", 0, "bench/README")),
    Figure("recovery", "tickets_double", "micro-batches counted twice", goal=_g("==", 0, "bench/README")),
    Figure("recovery", "detected_by_peer_report", "kills found through a neighbour's report"),
    Figure("codec", "activation_bytes_ratio_vs_fp16", "bytes across a stage boundary, fp16 over q3/q3",
           "fp16 both ways", _g(">=", 4, "issue 5"), published="AQ-SGD 4/8-bit: 2.67x"),
    Figure("codec", "activation_bytes_ratio_vs_fp16_q4_q3", "the same, q4 forward / q3 back", "fp16 both ways"),
    Figure("codec", "activation_bytes_ratio_vs_fp16_q4_q4", "the same, q4 / q4", "fp16 both ways"),
    Figure("codec", "activation_bytes_ratio_vs_fp16_q8_q8", "the same, q8 / q8", "fp16 both ways"),
    Figure("codec", "activation_rel_err_q3_q3", "relative error of q3, activations", "the float32 tensor"),
    Figure("codec", "gradient_rel_err_q3_q3", "relative error of q3, gradients", "the float32 tensor"),
    Figure("codec", "activation_rel_err_q4_q4", "relative error of q4, activations", "the float32 tensor"),
    Figure("codec", "activation_rel_err_q8_q8", "relative error of q8, activations", "the float32 tensor"),
    Figure("codec", "encode_gbps", "encode GB/s of float32 on one core (slowest codec)",
           goal=_g(">=", 1, "issue 5")),
    Figure("codec", "decode_gbps", "decode GB/s on one core (slowest codec)", goal=_g(">=", 1, "issue 5")),
    Figure("link", "slow_link_speedup", "tokens/s over an emulated slow link, q3/q3 over fp16",
           "fp16 both ways over the same link", _g(">=", 4.6, "issue 18"), headline=True,
           published="AQ-SGD: up to 4.3x (4.9x with gradient compression)"),
    Figure("link", "loss_gap_pct", "final loss gap, q3/q3 vs fp16 (%)", "the fp16 run's loss",
           _g("<=", 1, "issue 5"), headline=True),
    Figure("link", "chosen_codecs", "codecs stage 0 switched to (from its heartbeat)"),
    Figure("link", "predicted_step_s_fp16", "cost model's step (s), fp16 run", "measured `step_s_fp16`",
           predicted=True),
    Figure("link", "step_s_fp16", "measured step (s), fp16 run"),
    Figure("link", "predicted_step_s_chosen", "cost model's step (s), q3/q3 run", "measured `step_s_chosen`",
           predicted=True),
    Figure("link", "step_s_chosen", "measured step (s), q3/q3 run"),
    Figure("link", "period_s_chosen", "q3/q3 run: median seconds between two commits of a step (one micro-batch at the "
           "pipeline's pace)"),
    Figure("link", "bubble_s_chosen", "q3/q3 run: step minus its micro-batches x that period (s): fill, drain and tail"),
    Figure("link", "tail_s_chosen", "q3/q3 run: last commit to the step's close (s): reports, optimizer step, "
           "phase changes"),
    Figure("link", "speedup_without_tail", "speedup if the tail were gone (all that starting the next step early "
           "could save)", "`step_s_fp16` over `step_s_chosen` minus `tail_s_chosen`"),
    Figure("link", "speedup_without_bubble", "speedup if the whole bubble were gone (a step of micro-batches x "
           "period)", "`step_s_fp16` over micro-batches x `period_s_chosen`"),
    Figure("gradsync", "grad_bytes_ratio_vs_fp32", "gradient-sync bytes per optimizer step, fp32 over ours "
           "(full form: the median of the chosen setting's runs)",
           "fp32 all-reduce every step", _g(">=", 400, "issue 18"), headline=True,
           published="CocktailSGD 117x; DiLoCo / INTELLECT-1 ~400x"),
    Figure("gradsync", "loss_gap_pct", "loss gap after the run, ours (`chosen`) vs every-step (%) (full form: the "
           "median of the chosen setting's runs)",
           "every-step all-reduce's loss", _g("<=", 2, "issue 5"), headline=True),
    Figure("gradsync", "heldout_loss_gap_pct", "held-out loss gap of the final models (training objective), ours "
           "vs every-step (%) (full form: the median of the chosen setting's runs)",
           "every-step's final model on the same held-out examples", _g("<=", 2, "issue 18"), headline=True),
    Figure("gradsync", "fp32_allreduce_bytes_per_step", "bytes per replica per step, fp32 all-reduce"),
    Figure("gradsync", "chosen_bytes_per_step", "bytes per replica per step, ours (`chosen`)"),
    Figure("gradsync", "chosen_final_loss", "final loss, ours (mean of the last 3 steps)"),
    Figure("gradsync", "baseline_final_loss", "final loss, every-step (train-local in the full form)"),
    Figure("gradsync", "chosen_heldout_loss",
           "held-out loss of ours' final model (the replicas' mean; UL2, 512 sequences of 32 tokens)"),
    Figure("gradsync", "baseline_heldout_loss", "held-out loss of every-step's final model"),
    Figure("gradsync", "outer_every", "ours: steps between outer steps (the full form's sweep picks it)"),
    Figure("gradsync", "outer_density", "ours: share of each pseudo-gradient's coordinates an outer step sends"),
    Figure("gradsync", "chosen_failed_rounds", "ours: averaging rounds that failed (their bytes are counted)"),
    Figure("gradsync", "chosen_step_reruns", "ours: step attempts run again (their bytes are counted)"),
    Figure("scheduler", "worldwide.ratio_vs_random", "placement, worldwide scenario: random over ours (step time)",
           "median of 10 random placements", _g(">=", 5, "issue 6"), predicted=True, headline=True,
           published="DT-FM: 4.8x vs Megatron-style"),
    Figure("scheduler", "gap_vs_optimal", "worst gap to the exact optimum, six small instances",
           "branch and bound over the same plan space (`coordinator/placement_exact.py`)",
           _g("<=", 0.02, "issue 18"), predicted=True),
    Figure("scheduler", "gap_vs_longer_search", "worst gap to a 4x longer search, six 64-worker scenarios",
           "our search 4x as long from 2 more seeds", predicted=True),
    Figure("scheduler", "plan_ms", "slowest plan (ms), 64 workers, six scenarios", goal=_g("<", 1000, "issue 6"),
           headline=True),
    Figure("scheduler", "backstop_hit", "wall-clock backstop cut a search short", goal=_g("==", False, "issue 6")),
    Figure("scheduler", "worldwide.layers_moved_per_churn_event", "layers moved per churn event, worldwide",
           "a full re-plan from scratch (next row)", predicted=True),
    Figure("scheduler", "worldwide.layers_moved_per_churn_event_full_replan", "the same, re-planned from scratch",
           predicted=True),
    Figure("status", "status_ms", "status object per call (ms), warm; ledger of 5,000 closed steps (quick) or "
           "26,900 (full: GPT-JT phase 1)",
           "the queries it used to run: `full_scan_ms`", headline=True),
    Figure("status", "ratio_vs_full_scan", "old queries over the status object", "`full_scan_ms`"),
    Figure("status", "cold_ms", "first call after the coordinator opens the ledger (ms)"),
    Figure("status", "full_scan_ms", "the queries the status call used to run (ms)"),
    Figure("status", "by_workers.workers_build_ms", "status object and its JSON at 10,000 workers, one build of "
           "the status process (ms)", "its /metrics text: `by_workers.workers_metrics_ms` (next row)"),
    Figure("status", "by_workers.workers_metrics_ms", "/metrics text of that status (ms), rendered only for a "
           "scrape"),
    Figure("status", "by_workers.workers_status_gzip_mb", "that status gzipped, as `Status` sends it (MB; made "
           "in `by_workers.workers_gzip_ms`)", "its JSON: `by_workers.workers_status_mb`"),
    Figure("heartbeat", "heartbeat_p99_ms", "heartbeat p99 (ms), 10,000 workers with Watch streams, status, "
           "dashboard, a stage training; the full form's median of 3 runs (each: `heartbeat_p99_ms_runs`)",
           goal=_g("<", 10, "issues 15, 19"), headline=True),
    Figure("heartbeat", "heartbeat_p50_ms", "heartbeat p50 (ms), the median run"),
    Figure("heartbeat", "heartbeat_failures", "heartbeats that failed in the window", goal=_g("==", 0, "bench/README")),
    Figure("heartbeat", "joining_heartbeat_p99_ms", "heartbeat p99 (ms) while the 10,000 joined at once (`joins_s`), "
           "and one interval after"),
    Figure("heartbeat", "commits_per_s", "micro-batch commits per second meanwhile (leases: `leases_per_s`)"),
    Figure("heartbeat", "window_cpu_cores.coordinator", "cores the coordinator process used in the window (its "
           "status process, the simulated workers: `window_cpu_cores`)"),
    Figure("heartbeat", "window_cpu_cores.machine_busy", "cores of the machine busy in the window, of "
           "`machine_cores`"),
    Figure("chaos", "runs_completed", "chaos soaks completed", goal=_g("==", "runs_attempted", "issue 13")),
    Figure("chaos", "faults_survived", "faults survived over the completed soaks"),
    Figure("chaos", "tickets_lost", "micro-batches lost, all soaks", goal=_g("==", 0, "issue 13")),
    Figure("chaos", "tickets_double", "micro-batches counted twice, all soaks", goal=_g("==", 0, "issue 13")),
    Figure("chaos", "crashes", "crashed processes", goal=_g("==", 0, "issue 13")),
    Figure("chaos", "orphans", "orphaned processes", goal=_g("==", 0, "issue 13")),
    Figure("chaos", "wall_vs_calm", "median soak wall time (holds for replacements not counted) over a calm run's",
           "the same run without faults"),
    Figure("verify", "detection_steps",
           "steps to quarantine a liar (median; one never quarantined counts as the step after the run), 5 % spot checks",
           goal=_g("<=", 3, "issue 16"), headline=True,
           published="TOPLOC, Verde: verification of inference / training steps; hivemind, Petals, SWARM: none"),
    Figure("verify", "predicted_detection_steps_median", "the same, from docs/security.md's formula",
           predicted=True),
    Figure("verify", "false_positive_rate", "honest checks that disagreed", goal=_g("==", 0, "issue 16")),
    Figure("verify", "verify_overhead_pct", "tokens/s cost of 5 % spot checks (%)", "the same run with checks off",
           _g("<=", 5, "issue 16")),
    Figure("verify", "commitment_bytes", "commitment bytes per micro-batch (one stage)",
           goal=_g("<", 1024, "issue 16")),
    Figure("verify-calibration", "worst_honest_fp32", "worst honest disagreement, fp32 recomputations"),
    Figure("verify-calibration", "worst_honest_reduced", "worst honest disagreement, bf16 vs fp32"),
    Figure("verify-calibration", "tolerances_in_use_cover_measurement",
           "spot-check tolerances in use cover 10x the worst honest error",
           goal=_g("==", True, "docs/security.md")),
    Figure("nat", "relayed_vs_direct_tokens_per_s", "tokens/s with the last stage behind NAT, relayed over direct",
           "the same swarm with the worker reachable directly", _g(">=", 0.8, "issue 17"), headline=True,
           published="Petals, hivemind: libp2p relays, cost not published"),
    Figure("nat", "relayed_step_s", "median step (s), relayed"),
    Figure("nat", "direct_step_s", "median step (s), direct"),
    Figure("costmodel", "median_abs_error_pct", "cost model's step time vs measured, median |error| (%), 4 "
           "unpaced CPU swarms", "the swarms' measured median step"),
    Figure("costmodel", "worst_abs_error_pct", "the same, worst |error| (%)", "the swarms' measured median step"),
    Figure("costmodel", "1+1 threads, loopback, 1 stage x 2 replicas allowed.error_pct",
           "the same, error (%) of the swarm allowed 1 stage x 2 replicas (data parallel)",
           "that swarm's measured median step"),
    Figure("churn", "goodput_vs_no_churn", "simulated goodput, first hour of 1,000 volunteers with 2 h median sessions, over no churn",
           "the same simulation with nobody leaving", _g(">=", 0.85, "issue 19"), predicted=True,
           verdict_key="goal_met"),
    Figure("churn", "static_goodput_vs_no_churn", "the same for a static plan restarting from its last checkpoint",
           "our no-churn simulation (DT-FM-style static pipeline)", predicted=True),
    Figure("churn", "live_plan_vs_full_knowledge", "no-churn tokens/s, live coordinator's plan over a plan "
           "searched with every link known", "the static baseline's plan without churn", predicted=True),
    Figure("churn", "rolled_back_share", "share of time in steps undone by rollbacks or restarted attempts",
           predicted=True),
    Figure("churn", "waiting_share", "share of time with no step running (loading, restores, noticing deaths)",
           predicted=True),
    Figure("churn", "idle_standby_share", "share of volunteer-time on standby", predicted=True),
    Figure("churn", "layers_moved_per_hour", "layers the coordinator's plans moved per hour", predicted=True),
    Figure("churn", "coordinator_cpu_per_sim_s", "coordinator CPU s per simulated s (ledger calls, heartbeats, reaper)",
           "measured on this machine, gRPC not included (bench heartbeat)"),
    Figure("churn", "plan_searches", "placement searches run (the rest answered by the memo: `plan_search_hits`)"),
    Figure("churn", "plan_search_backstop_hits", "searches the wall-clock backstop cut short",
           goal=_g("==", 0, "a run repeats exactly only without (bench/churn.py)")),
    Figure("gpu-swarm", "swarm_vs_local_tokens_per_s", "GPT-J 6B, 4 stages on one GPU: swarm over train-local tokens/s",
           "train-local of the same run on the same GPU"),
    Figure("gpu-swarm", "memory_worst_measured_over_predicted", "worst stage's allocator peak over the memory model",
           "coordinator/memory_model.py (the GPU test asks 0.9-1.1)"),
    Figure("gpu-swarm", "swarm_mfu", "swarm MFU against the measured bf16 matmul peak"),
    Figure("gpu-block", "block_tflops", "GPT-J 6B block fwd+bwd TFLOP/s, bf16, seq 2048", headline=True),
    Figure("gpu-block", "mfu_vs_measured_matmul", "the same over a bf16 matmul's measured rate",
           "`matmul_bf16_tflops` on the same GPU"),
    Figure("gpu-block", "measured_over_predicted_block_probe", "measured block time over the cost model's",
           "cost model fed by the worker's block probe"),
)


def _sweep_figures() -> tuple[Figure, ...]:
    """bench churn-sweep's points, in its order (bench/churn_sweep.py: each size, each median)."""
    from .churn_sweep import MEDIANS_S, WORKERS

    return tuple(Figure("churn-sweep", f"points.{i * len(MEDIANS_S) + j}.{key}",
                        f"{who}, {n:,} volunteers, median session {_duration(m)}: goodput over no churn",
                        "ours without churn, one run", predicted=True)
                 for key, who in (("goodput_vs_no_churn", "ours"), ("static_goodput_vs_no_churn", "static restart"))
                 for i, n in enumerate(WORKERS) for j, m in enumerate(MEDIANS_S))


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min"


FIGURES += _sweep_figures()


def benchmarks_shown() -> list[str]:
    """The benchmarks with figures in the catalogue, in its order."""
    return list(dict.fromkeys(f.bench for f in FIGURES))
