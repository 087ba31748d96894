"""Fault injection for tests and drills: GPTJT_FAULTS="kind@step[:fraction][,kind@step...]".

Kinds:
  poison@N          multiply this replica's gradient at step N by 1e6 before it is contributed
                    (a byzantine or broken replica; the coordinator must refuse it)
  nan@N             put NaN in this replica's gradient at step N
  inf@N             an fp16 overflow: one inf in this replica's gradient at step N, in the first
                    attempt only (a loss-scaled run re-runs the step at half the scale, which then
                    does not overflow)
  die-averaging@N   SIGKILL this process halfway through the matchmaking of its averaging round
                    at step N (its group is forming, and then it is gone)
  die-checkpoint@N  SIGKILL this process halfway through uploading its stage's checkpoint of
                    step N (the state after N steps) to the store
  isolate-averaging@N  from step N on, this replica's rounds carry a tag no other replica uses
                    (a modified or broken peer): every round of its stage fails, rebuilt
                    averagers included, until the coordinator takes a replica out

Lying kinds (worker/lies.py): from step N on, and for good, the stage falsifies what it sends.
  lie-scale@N       multiply its forward output by GPTJT_LIE_SCALE (default 1.1)
  lie-noise@N       add Gaussian noise of GPTJT_LIE_NOISE (default 0.05) x the tensor's RMS
  lie-zero@N        send zeros
  lie-stale@N       replay its output of an earlier micro-batch of the same shape (the last honest
                    one, of another ticket; a micro-batch with nothing to replay goes out honest)
  lie-MODE-grad@N   the same, on the gradient it sends back upstream instead (stage 0 sends none)
  lie-state@N       once its stage holds the state after N steps, the state it hands a joiner or
                    an export (FetchState) has its weights multiplied by GPTJT_LIE_SCALE: not the
                    state it trains and reports (worker/lies.altered_state)
  ...@N:F           on a fraction F in (0, 1] of micro-batches only, chosen from each micro-batch's
                    (ticket, attempt) by a seeded hash, so a run picks the same ones every time
A forward-output lie at the last stage falsifies the loss share it reports (its only output).
The defaults move a tensor by 10 % (scale) and ~5 % (noise, on a tensor of many values) of its
norm, so a recompute check at 1e-2 relative tolerance must catch them; zero moves it by 100 %,
stale by as much as two micro-batches' outputs differ. At most one output and one -grad lie.
The liar's own parameter gradients stay honest (worker/lies.py says why).

GPTJT_FAULTS_ONCE_DIR: a directory shared by the swarm's workers. When set, each kind@step
fires in ONE process only, once (the first to create its marker file there): a chaos soak arms
every worker with the same faults and exactly one of them dies. A lie is claimed the same way
(the first process whose micro-batch it would falsify) and that process then keeps lying.

Unset in normal runs; parsing is strict so a typo fails loudly instead of silently testing nothing.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

LIE_MODES = ("scale", "noise", "zero", "stale")
GRAD_SUFFIX = "-grad"  # a lie on the gradient sent upstream rather than on the forward output
LIE_KINDS = tuple(f"lie-{mode}{suffix}" for suffix in ("", GRAD_SUFFIX) for mode in LIE_MODES)
STATE_LIE = "lie-state"  # a lie on the stage state others copy, not on what a micro-batch sends
KINDS = ("poison", "nan", "inf", "die-averaging", "die-checkpoint", "isolate-averaging", STATE_LIE) + LIE_KINDS


class Armed(NamedTuple):
    """When a kind fires: at `step` (from `step` on, for lies), on a `fraction` of micro-batches."""

    step: int
    fraction: float = 1.0


def parse_faults(text: str) -> dict[str, Armed]:
    faults: dict[str, Armed] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"([a-z-]+)@(\d+)(?::(\d*\.?\d+))?", item)
        if m is None or m.group(1) not in KINDS:
            raise ValueError(f"GPTJT_FAULTS item {item!r} is invalid: expected KIND@STEP with KIND in {KINDS}, "
                             "or LIE@STEP:FRACTION for a lie-* kind")
        kind, fraction = m.group(1), m.group(3)
        if fraction is not None and kind not in LIE_KINDS:
            raise ValueError(f"GPTJT_FAULTS item {item!r}: only lie-* kinds take a fraction of micro-batches; "
                             f"write {kind}@{m.group(2)}")
        f = float(fraction) if fraction is not None else 1.0
        if not 0.0 < f <= 1.0:
            raise ValueError(f"GPTJT_FAULTS item {item!r}: the fraction of micro-batches is {f}; give one in (0, 1]")
        rivals = [k for k in faults if k in LIE_KINDS and k != kind and _on_grad(k) == _on_grad(kind)]
        if kind in LIE_KINDS and rivals:
            raise ValueError(f"GPTJT_FAULTS arms {rivals[0]} and {kind}: a stage tells one lie per tensor; "
                             "arm one output lie and one -grad lie at most")
        faults[kind] = Armed(int(m.group(2)), f)
    return faults


def _on_grad(kind: str) -> bool:
    return kind.endswith(GRAD_SUFFIX)


class LieSettings(NamedTuple):
    """How much a lie changes a tensor: its scale factor, and its noise as a multiple of its RMS."""

    scale: float = 1.1
    noise: float = 0.05

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> LieSettings:
        scale = _finite(env, "GPTJT_LIE_SCALE", cls._field_defaults["scale"])
        noise = _finite(env, "GPTJT_LIE_NOISE", cls._field_defaults["noise"])
        if scale == 1.0:
            raise ValueError("GPTJT_LIE_SCALE=1 makes lie-scale honest, which tests nothing; unset it (1.1) "
                             "or give another factor")
        if noise <= 0.0:
            raise ValueError(f"GPTJT_LIE_NOISE={noise} adds no noise; give a multiple of the RMS > 0 (default 0.05)")
        return cls(scale, noise)


def _finite(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{name}={text!r} is not a finite number; unset it (default {default}) or give one")
    return value


class Faults:
    """The faults armed in this process; `fires(kind, step)` says whether one applies now."""

    def __init__(self, armed: dict[str, Armed], once_dir: str = "", lie: LieSettings = LieSettings()):
        self.armed = armed
        self.once_dir = Path(once_dir) if once_dir else None
        self.lie = lie
        self._claimed: set[str] = set()

    @classmethod
    def from_env(cls) -> Faults:
        # LieSettings are read here too, so a bad GPTJT_LIE_* fails when the worker starts
        return cls(parse_faults(os.environ.get("GPTJT_FAULTS", "")), os.environ.get("GPTJT_FAULTS_ONCE_DIR", ""),
                   LieSettings.from_env())

    def fires(self, kind: str, step: int) -> bool:
        armed = self.armed.get(kind)
        if armed is None or armed.step != step:
            return False
        if self.once_dir is None:
            return True
        if not self._mark(f"{kind}@{step}"):
            self.armed.pop(kind)  # someone else's; never ask the file system again
            return False
        return True

    def spend(self, kind: str) -> None:
        """A fault that happens once, not in every attempt of its step (inf@N)."""
        self.armed.pop(kind, None)

    def give_back(self, kind: str, step: int) -> None:
        """A fault that fired but could not be carried out (die-checkpoint whose upload the
        coordinator refused before it was half sent: our session had ended) goes back to the
        pool: the next process to reach it, or this one again, carries it out. A chaos soak
        counts on every armed fault happening once."""
        if self.once_dir is not None:
            (self.once_dir / f"{kind}@{step}").unlink(missing_ok=True)

    def claim(self, kind: str) -> bool:
        """Whether this process carries out `kind` (a lie, which continues after its step): always
        without GPTJT_FAULTS_ONCE_DIR; with it, only the first process to ask, for good."""
        if kind in self._claimed:
            return True
        if kind not in self.armed:
            return False
        if self.once_dir is not None and not self._mark(f"{kind}@{self.armed[kind].step}"):
            self.armed.pop(kind)
            return False
        self._claimed.add(kind)
        return True

    def _mark(self, name: str) -> bool:
        try:  # O_EXCL: of every process sharing the directory, exactly one creates the marker
            os.close(os.open(self.once_dir / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True


def faults_from_env() -> Faults:
    return Faults.from_env()
