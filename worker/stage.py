"""The layer slice a worker holds: forward/backward of one micro-batch, the optimizer step. No networking."""

from __future__ import annotations

import math
import time

import torch

from gptjt_core.config import RunConfig
from gptjt_core.model import StageSpec, build_stage, load_stage, model_config_for
from gptjt_core.optim import build_optimizer, lr_at, set_lr
from gptjt_core.outer_sparsity import OuterSparsifier
from gptjt_core.precision import resolve_precision
from gptjt_core.stage_checkpoint import outer_state, restore_optimizer, split_state, stage_state_tensors
from gptjt_core.state_digest import state_digest
from gptjt_core.ul2 import batch_loss
from gptjt_core.verify_config import STANDBY_EVIDENCE_STEPS

Key = tuple[int, int]  # (ticket_id, attempt)


class StaleMicroBatch(RuntimeError):
    """A micro-batch of a restarted step attempt: its work must be discarded."""


class LayerSlice:
    """The layers of one stage this worker holds: weights (fp32 masters), optimizer state and the
    autograd graphs of micro-batches in flight; forward, backward and the optimizer step. It
    runs nothing by itself and knows no network (the worker's compute queue drives it).

    Call only from one thread (the stage's ComputeQueue): a forward's graph is consumed by
    the backward of the same key.
    """

    def __init__(self, run: RunConfig, spec: StageSpec, device: str = "cpu",
                 checkpoint: dict[str, torch.Tensor] | None = None, position: int = 0):
        """checkpoint: weights + optimizer state from the store (else the run's initial weights);
        position: optimizer steps already applied to that state."""
        self.run, self.spec = run, spec
        self.device = torch.device(device)
        self.precision = resolve_precision(run.train.precision, self.device)
        if checkpoint is None:
            self.model = load_stage(run.model.source, spec, dtype=torch.float32, device=self.device,
                                    attn_implementation=run.model.attn_implementation)
            optim_state = {}
        else:
            weights, optim_state = split_state(checkpoint)
            config = model_config_for(run.model.source, run.model.attn_implementation)
            self.model = build_stage(config, spec, weights, self.device, origin="the checkpoint store")
        self.model.train()
        self.model.checkpoint_segment = run.pipeline.checkpoint_segment
        self.optimizer = build_optimizer(self.model.parameters(), run.optim)
        restore_optimizer(self.optimizer, self.model, optim_state)
        self._init_local_steps(checkpoint)
        self.attempt: tuple[int, int] | None = None  # (step, attempt) whose gradients accumulate
        self.last_applied = position - 1  # the last step whose optimizer update this state holds
        self._inflight: dict[Key, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.micro_batches = 0  # processed since the worker started
        self.step_micro_batches = 0  # whose gradients the current attempt holds
        # The attempt whose parameter gradients were divided by its loss scale (once: the report
        # that needs them unscaled may be retried). gptjt_core/loss_scale.py has the protocol.
        self.unscaled: tuple[int, int] | None = None
        self.pacer = None  # a simulated device's ComputePacer (tests and benchmarks only)
        self._tokens: dict[Key, int] = {}  # B x T of each forward in flight, for the pacer
        # The current attempt's commitments (worker/commitments.py Committed), reported with its
        # CONTRIBUTION; filled by worker/micro_batch_work.py as each micro-batch's backward ends.
        self.commitments: dict[Key, object] = {}
        # Spot checks (worker/spot_check.py): what each micro-batch of the last two steps received
        # (worker/evidence.py Evidence, served to a replica or a standby checking us) and, with
        # replicas, the weights this one held before its last update (to check a replica's
        # micro-batch of that step). Only when the run spot-checks: the copy costs one set of
        # weights in host memory.
        self.keep_evidence = (run.verify.sample_rate > 0 or run.verify.first_checks > 0) and not self.local_steps
        self.keep_weights = self.keep_evidence and run.pipeline.replicas_per_stage > 1
        self.evidence: dict[Key, object] = {}
        self._before_update: tuple[int, dict[str, torch.Tensor] | None] | None = None  # (step, weights before it)

    def matmul_params(self) -> int:
        """Parameters a forward multiplies by (all but the embedding table)."""
        wte = getattr(self.model.transformer, "wte", None)
        embed = wte.weight.numel() if wte is not None else 0
        return sum(p.numel() for p in self.model.parameters()) - embed

    def _pace(self, passes: int, tokens: int, started: float) -> None:
        if self.pacer is not None:
            self.pacer.hold(passes, tokens, started)

    # -- attempts ----------------------------------------------------------------------
    def begin(self, step: int, attempt: int) -> None:
        """Make (step, attempt) current; a different attempt discards accumulated gradients."""
        if self.attempt != (step, attempt):
            if self.attempt is not None:
                self.optimizer.zero_grad(set_to_none=True)  # restarted step: drop partial sums
            self._inflight.clear()
            self.commitments.clear()
            self.attempt = (step, attempt)
            self.step_micro_batches = 0
            self.unscaled = None
            self.pending_outer = None  # an outer step averaged in another attempt is not this one's
            self.pending_residual = None

    def admit(self, step: int, attempt: int) -> None:
        """Accept work of (step, attempt): a newer attempt becomes current (stages learn of a
        restart from the first micro-batch that carries it); older work is stale."""
        if step <= self.last_applied or (self.attempt is not None and (step, attempt) < self.attempt):
            raise StaleMicroBatch(f"micro-batch of step {step} attempt {attempt} is stale: this stage is on "
                                  f"{self.attempt or f'step {self.last_applied + 1}'}")
        self.begin(step, attempt)

    def _check(self, step: int, attempt: int) -> None:
        self.admit(step, attempt)

    # -- micro-batches -----------------------------------------------------------------
    def forward(self, key: Key, step: int, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Forward of a non-last stage; keeps the graph until backward(key). Returns (B, T, D)."""
        self._check(step, key[1])
        started = time.perf_counter()
        x = x.to(self.device)
        if not self.spec.embed:
            x = x.requires_grad_()
        with self.precision.autocast():
            out = self.model(x, prefix.to(self.device))
        self._inflight[key] = (x if not self.spec.embed else None, out)
        self._tokens[key] = out.shape[0] * out.shape[1]
        self._pace(2, self._tokens[key], started)
        return out.detach()

    def backward(self, key: Key, step: int, grad_out: torch.Tensor) -> torch.Tensor | None:
        """Backward of a non-last stage; returns d loss / d input (None for the embedding stage)."""
        self._check(step, key[1])
        if key not in self._inflight:
            raise StaleMicroBatch(f"no forward in flight for ticket {key[0]} attempt {key[1]}")
        started = time.perf_counter()
        x, out = self._inflight.pop(key)
        out.backward(grad_out.to(device=self.device, dtype=out.dtype))
        self._pace(4, self._tokens.pop(key, 0), started)
        self.micro_batches += 1
        self.step_micro_batches += 1
        return x.grad.detach() if x is not None else None

    def forward_backward(self, key: Key, step: int, x: torch.Tensor, prefix: torch.Tensor,
                         labels: torch.Tensor, global_batch: int,
                         loss_scale: float = 1.0) -> tuple[float, int, torch.Tensor | None]:
        """The last stage: logits, UL2 loss share, backward of loss x loss_scale (the attempt's, from
        the coordinator). Returns (loss, targets, d (loss x loss_scale) / d input): the loss
        unscaled, the gradient scaled, as it travels upstream."""
        self._check(step, key[1])
        started = time.perf_counter()
        x = x.to(self.device)
        if not self.spec.embed:
            x = x.requires_grad_()
        labels = labels.to(self.device)
        with self.precision.autocast():
            logits = self.model(x, prefix.to(self.device))  # (B, T, V)
        loss = batch_loss(logits, labels, global_batch)
        (loss * loss_scale if loss_scale != 1.0 else loss).backward()
        self._pace(6, labels.numel(), started)
        self.micro_batches += 1
        self.step_micro_batches += 1
        targets = int((labels[:, 1:] != -100).sum())
        return float(loss.detach()), targets, (x.grad.detach() if not self.spec.embed else None)

    def discard(self, key: Key) -> None:
        """Forget a forward whose backward will never come (the downstream call failed)."""
        self._inflight.pop(key, None)
        self._tokens.pop(key, None)

    @property
    def position(self) -> int:
        """Optimizer steps applied to the state this stage holds."""
        return self.last_applied + 1

    def reset_to_position(self) -> None:
        """Keep the weights, drop partial gradients and in-flight graphs (a step was restarted)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._inflight.clear()
        self.commitments.clear()
        self.attempt = None
        self.step_micro_batches = 0
        self.unscaled = None
        self.pending_outer = None
        self.pending_residual = None

    def checkpoint_blob(self) -> bytes:
        """Weights + optimizer state (+ the outer state in local-steps mode) as a safetensors blob."""
        from safetensors.torch import save

        outer = {"anchor": self.anchor, "momentum": self.outer_momentum} if self.local_steps else None
        return save(stage_state_tensors(self.model, self.optimizer, outer))

    def gradients(self) -> list[torch.Tensor]:
        """Every parameter's gradient (zeros where none accumulated), in parameter order: the
        tensors replicas sum. A replica that saw no micro-batch still takes part."""
        for p in self.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.model.parameters()]

    def state_digest(self) -> str:
        """The digest of the weights (gptjt_core/state_digest.py): equal across replicas exactly when
        they hold the same values, and what `gptjt export` checks the state it is sent against. In
        local-steps mode, of the anchor: the state replicas share (their weights differ between
        outer steps)."""
        if self.anchor is not None:
            return state_digest({n: a for (n, _), a in zip(self.model.named_parameters(), self.anchor)})
        return state_digest(self.model.state_dict())

    # -- the optimizer step ------------------------------------------------------------
    def unscale_gradients(self, loss_scale: float) -> None:
        """Divide the current attempt's parameter gradients by its loss scale, once (a power of
        two: exact in fp32). An overflow stays inf/NaN, which the norm then reports."""
        if self.attempt is None or self.unscaled == self.attempt or loss_scale in (0.0, 1.0):
            return
        self.unscaled = self.attempt
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(loss_scale)

    def grad_norm_sq(self) -> float:
        """Sum of squared gradient norms of this stage (the coordinator adds the stages)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return float(sum(torch.linalg.vector_norm(g.float()) ** 2 for g in grads))

    def apply_step(self, step: int, global_norm: float) -> bool:
        """Clip by the global norm of the whole model, as torch's clip_grad_norm_ does, and step.

        Returns False (update skipped, gradients dropped) when the global norm is not finite.
        """
        ok = math.isfinite(global_norm)
        if ok:
            max_norm = self.run.optim.grad_clip
            if max_norm > 0:
                coef = min(1.0, max_norm / (global_norm + 1e-6))
                if coef < 1.0:
                    for p in self.model.parameters():
                        if p.grad is not None:
                            p.grad.mul_(coef)
            set_lr(self.optimizer, lr_at(step, self.run.optim, self.run.train.steps))
            if self.keep_weights:
                self._before_update = (step, {n: p.detach().to("cpu", copy=True)
                                              for n, p in self.model.named_parameters()})
            self.optimizer.step()
        elif self.keep_weights:
            self._before_update = (step, None)  # skipped: the weights of `step` are the current ones
        self._end_step(step)
        return ok

    def weights_for(self, step: int) -> dict[str, torch.Tensor] | None:
        """The parameters this replica held during `step` (by name, on its device), or None when
        it no longer has them: its current ones while `step` is not applied yet, else the copy
        apply_step kept of the state before the update of `step`."""
        if self.last_applied == step - 1:
            return dict(self.model.named_parameters())
        kept = self._before_update
        if self.last_applied == step and kept is not None and kept[0] == step:
            if kept[1] is None:  # the update was skipped (non-finite norm)
                return dict(self.model.named_parameters())
            return {n: t.to(self.device) for n, t in kept[1].items()}
        return None

    def _end_step(self, step: int) -> None:
        """Drop the step's gradients and graphs: this state now holds `step`."""
        self.optimizer.zero_grad(set_to_none=True)
        self._inflight.clear()
        self.attempt = None
        self.step_micro_batches = 0
        self.unscaled = None
        self.last_applied = step
        # Keep the step just applied (replicas check it now) and the next; with one replica, the
        # STANDBY_EVIDENCE_STEPS last ones (standbys load the stage from the store first).
        keep = 1 if self.keep_weights else STANDBY_EVIDENCE_STEPS
        for key in [k for k, e in self.evidence.items() if e.step <= step - keep]:
            del self.evidence[key]

    # -- local-steps (DiLoCo-style) averaging ------------------------------------------------
    def _init_local_steps(self, checkpoint: dict | None) -> None:
        """averaging.mode "local-steps": the parameters at the last outer step (fp32, parameter
        order), the outer Nesterov momentum, and the replicas' mean pseudo-gradient waiting for
        APPLYING. Replicas hold the same anchor; their parameters drift apart in between. With
        averaging.outer_density < 1 also the coordinates each outer step averages, this
        replica's residual (error feedback) and the residual the pending outer step leaves."""
        run = self.run
        self.local_steps = run.averaging.mode == "local-steps"
        self.anchor: list[torch.Tensor] | None = None
        self.outer_momentum: list[torch.Tensor] | None = None
        self.pending_outer: list[torch.Tensor] | None = None  # for self.attempt only (begin() drops it)
        self.sparsifier: OuterSparsifier | None = None
        self.pending_residual: list[torch.Tensor] | None = None
        if not self.local_steps:
            return
        if run.averaging.outer_density < 1:
            self.sparsifier = OuterSparsifier(run.averaging.outer_density,
                                              f"{run.name}:{self.spec.start}-{self.spec.end}",
                                              [p.shape for p in self.model.parameters()])
        saved = outer_state(checkpoint) if checkpoint is not None else {}
        named = list(self.model.named_parameters())
        self.anchor = [saved.get("anchor", {}).get(n, p.detach()).to(self.device, torch.float32).clone()
                       for n, p in named]
        if "momentum" in saved and all(n in saved["momentum"] for n, _ in named):
            self.outer_momentum = [saved["momentum"][n].to(self.device, torch.float32).clone() for n, _ in named]

    def pseudo_gradients(self) -> list[torch.Tensor]:
        """anchor - parameters, fp32, in parameter order: how far local steps moved this replica."""
        return [a - p.detach().float() for a, p in zip(self.anchor, self.model.parameters())]

    def averaged_shapes(self) -> list[torch.Size]:
        """The tensors this stage's averager sums: the parameters' shapes, or at an outer density
        below 1 one length-k vector per parameter (gptjt_core/outer_sparsity.py)."""
        if self.sparsifier is not None:
            return self.sparsifier.averaged_shapes()
        return [p.shape for p in self.model.parameters()]

    def outer_contribution(self, step: int) -> list[torch.Tensor]:
        """What this replica averages at the outer step of `step`: its pseudo-gradients, or their
        chosen coordinates plus its residual (the residual they leave is staged until applied)."""
        deltas = self.pseudo_gradients()
        if self.sparsifier is None:
            return deltas
        values, residual = self.sparsifier.select(deltas, step)
        # a non-finite pseudo-gradient is not averaged (the round gives it weight 0): keep the old residual
        self.pending_residual = residual if all(bool(torch.isfinite(r).all()) for r in residual) else None
        return values

    def set_outer_mean(self, step: int, mean: list[torch.Tensor]) -> None:
        """The replicas' mean of outer_contribution(step): applied in APPLYING (dense)."""
        self.pending_outer = self.sparsifier.expand(mean, step) if self.sparsifier is not None else mean

    def _apply_outer(self) -> None:
        """anchor -= outer_lr * (Nesterov) mean pseudo-gradient; parameters := anchor."""
        cfg = self.run.averaging
        delta, self.pending_outer = self.pending_outer, None
        if self.sparsifier is not None and self.pending_residual is not None:
            self.sparsifier.commit(self.pending_residual)  # what this replica did not send waits for the next one
            self.pending_residual = None
        if cfg.outer_momentum > 0:
            if self.outer_momentum is None:
                self.outer_momentum = [torch.zeros_like(a) for a in self.anchor]
            updates = []
            for m, d in zip(self.outer_momentum, delta):
                m.mul_(cfg.outer_momentum).add_(d)
                updates.append(d + cfg.outer_momentum * m)
        else:
            updates = delta
        with torch.no_grad():
            for a, p, u in zip(self.anchor, self.model.parameters(), updates):
                a.sub_(u.to(a.device, a.dtype), alpha=cfg.outer_lr)
                p.copy_(a)

    def apply_local(self, step: int, global_norm: float, contribute: bool, total_micro_batches: int) -> bool:
        """Local-steps mode's APPLYING: the outer step if one is pending, then this replica's
        own inner step: its gradients (its share of the step) scaled to a full batch. A replica
        that saw no micro-batch, or whose contribution was refused, only moves its position."""
        if self.pending_outer is not None:
            self._apply_outer()
        mbs = self.step_micro_batches
        if contribute and mbs > 0:
            if mbs != total_micro_batches:
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(total_micro_batches / mbs)
            return self.apply_step(step, global_norm)
        self._end_step(step)
        return True
