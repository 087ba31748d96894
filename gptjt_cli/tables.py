"""Human tables of the status object (rich), for the operator commands and the demo."""

from __future__ import annotations

import io
import shutil
import sys
import time

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gptjt_core.wire_checks import escaped

ALIVE = ("loading", "ready", "standby", "draining")


def console(file=None) -> Console:
    """Colour on a terminal; wide plain text otherwise (pipes, tests), so rows never wrap."""
    out = file or sys.stdout
    tty = out.isatty() if hasattr(out, "isatty") else False
    width = shutil.get_terminal_size((200, 40)).columns if tty else 200
    return Console(file=out, width=width, no_color=not tty, highlight=False, soft_wrap=False)


def to_text(*renderables) -> str:
    buf = io.StringIO()
    c = console(buf)
    for i, r in enumerate(renderables):
        if i:
            c.print()
        c.print(r)
    return buf.getvalue().rstrip("\n")


def _table(headers: list[str], rows: list[list], numeric: tuple[str, ...] = ()) -> Table:
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for h in headers:
        t.add_column(h, justify="right" if h in numeric else "left", no_wrap=True)
    for r in rows:
        # cells carry what workers sent (event details, names): escaped, and never read as rich markup
        t.add_row(*(Text(escaped("" if c is None else str(c))) for c in r))
    return t


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    m, h = int(s // 60), int(s // 3600)
    return f"{h}h{m % 60:02d}m" if h else f"{m}m{int(s % 60):02d}s"


def _bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def workers_table(s: dict) -> Table:
    rows = []
    for w in s["workers"]:
        m, d = w["metrics"], w["device"]
        state = w["state"] + (" (drain asked)" if w.get("drain_requested") and w["state"] != "draining" else "")
        rows.append([w["id"], w["name"], w["stage"] if w["stage"] >= 0 else "-", state,
                     " ".join(filter(None, [d.get("kind"), d.get("name")])) or "-", _bytes(d.get("memory_bytes")),
                     _duration(s["now"] - w["joined"]) + " ago" if w.get("joined") else "-",
                     f"{w['last_heartbeat_s']:.1f}s", f"{m.get('micro_batches_per_s', 0):.2f}",
                     f"{100 * m.get('busy_fraction', 0):.0f}%", w["tickets_done"],
                     "straggler" if w["id"] == s.get("straggler") else "", w["address"]])
    return _table(["worker", "name", "stage", "state", "device", "memory", "joined", "heartbeat", "mb/s", "busy",
                   "tickets", "", "address"], rows, ("stage", "memory", "joined", "heartbeat", "mb/s", "busy",
                                                     "tickets"))


def stages_table(s: dict) -> Table:
    by_id = {w["id"]: w for w in s["workers"]}
    rows = []
    for st in s["stages"]:
        replicas = []
        for wid in st["workers"]:
            m = by_id.get(wid, {}).get("metrics", {})
            link = f", {m['downstream_mbit']:.0f} Mbit/s" if m.get("downstream_mbit") else ""
            codec = f" {m['activation_codec']}/{m['gradient_codec']}" if m.get("activation_codec") else ""
            mark = "*" if wid == s.get("straggler") else ""
            replicas.append(f"{wid}{mark} ({m.get('micro_batches_per_s', 0):.2f} mb/s, "
                            f"{100 * m.get('busy_fraction', 0):.0f}% busy{link}{codec})")
        rates = [by_id.get(wid, {}).get("device", {}) for wid in st["workers"]]
        rows.append([st["index"], f"{st['start_layer']}-{st['end_layer']}",
                     " ".join(filter(None, ["embed" if st["embed"] else "", "head" if st["head"] else ""])),
                     " + ".join(_rate(d, st["head"]) for d in rates) or "-",
                     "; ".join(replicas) or "(vacant)"])
    table = _table(["stage", "layers", "holds", "TFLOP/s", "workers (* straggler)"], rows, ("stage",))
    table.caption, table.caption_justify = plan_summary(s.get("plan") or {}), "left"
    return table


def _rate(device: dict, head: bool) -> str:
    """A worker's measured TFLOP/s on one block, and on the LM head where its stage holds it."""
    block = f"{device.get('block_tflops') or device.get('matmul_tflops', 0):.3g}"
    return f"{block} (head {device['head_tflops']:.3g})" if head and device.get("head_tflops") else block


def plan_summary(plan: dict) -> str:
    """The scheduler's view: predicted vs measured step time, the last re-plan, standby reasons."""
    fmt = lambda v: f"{v:.3g} s" if v is not None else "n/a"  # noqa: E731
    lines = [f"placement {plan.get('placement', '?')}: predicted step {fmt(plan.get('predicted_step_s'))}, "
             f"measured {fmt(plan.get('measured_step_s'))} (median of the last 5 steps)"]
    last = plan.get("last_replan")
    if last:
        lines.append(f"last re-plan at step {last['step']}: {last['why']} ({last['layers_moved']} layer(s) moved; "
                     f"{plan.get('layers_moved_total', 0)} in all)")
    if plan.get("pending"):
        to = ", ".join(f"{a}-{b}" for a, b in plan.get("pending_ranges") or [])
        lines.append(f"pending re-plan{' to layers ' + to if to else ''} (applies at the next complete "
                     f"checkpoint): {plan['pending']}")
    for worker, why in sorted((plan.get("standby_why") or {}).items()):
        lines.append(f"standby {worker}: {why}")
    return "\n".join(lines)


def tickets_table(s: dict) -> Table:
    t = s["tickets"]
    keys = ["issued", "committed", "reissued", "leased", "pending", "aborted", "rolled_back", "lost", "double"]
    return _table(keys, [[t[k] for k in keys]], tuple(keys))


def events_table(events: list[dict]) -> Table:
    return _table(["id", "time", "category", "kind", "detail"],
                  [[e["id"], time.strftime("%H:%M:%S", time.localtime(e["ts"])), e["category"], e["kind"], e["detail"]]
                   for e in events], ("id",))


def tokens_table(tokens: list[dict]) -> Table:
    return _table(["id", "created", "state"],
                  [[t["id"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["created"])),
                    "revoked" if t["revoked"] else "valid"] for t in tokens])


def summary(s: dict) -> str:
    loss = f"{s['loss']:.4f}" if s["loss"] is not None else "-"
    latest = s["checkpoints"]["latest_complete"]
    first = (f"run {s['run']}: step {s['step']}/{s['steps_total']} ({s['phase']}"
             f"{', paused' if s['paused'] else ''}), loss {loss}, {s['tokens']:,} tokens, "
             f"{s['tokens_per_s']:,.0f} tokens/s, last full checkpoint: "
             f"{'step ' + str(latest) if latest is not None else 'none'}")
    if "tokens_target" not in s:  # an older coordinator
        return first
    predicted = (s.get("plan") or {}).get("predicted_step_s")
    live = sum(w["state"] in ALIVE for w in s["workers"])
    second = (f"tokens {s['tokens']:,} of {s['tokens_target']:,}, ETA {_duration(s['eta_s'])}, lr {s['lr']:.3g}, "
              f"step time {_duration(s['measured_step_s'])}"
              + (f" (predicted {_duration(predicted)})" if predicted is not None else "")
              + f", {live} live worker(s)" + (f", straggler {s['straggler']}" if s.get("straggler") else ""))
    v = s.get("verification") or {}
    if "spot_verified_fraction" not in v:  # an older coordinator
        return first + "\n" + second
    third = (f"spot checks {v['spot_checks']:,} ({v['spot_agree']:,} agreed, {v['spot_disagree']:,} disagreed), "
             f"{100 * v['spot_verified_fraction']:.2f} % of the work verified, {v['quarantined']} quarantined, "
             f"chain mismatches {v['mismatches']:,}")
    return first + "\n" + second + "\n" + third
