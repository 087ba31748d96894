"""The single-process reference trainer: the whole model as one stage, same data and loss as the swarm."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .batches import MicroBatchBuilder
from .checkpoint import write_checkpoint
from .config import RunConfig
from .data import step_micro_batches
from .export import export_checkpoint, hf_config_dict
from .model import StageSpec, load_stage, model_config_for
from .optim import build_optimizer, clip_gradients, load_optimizer_state, lr_at, set_lr
from .loss_scale import scaling_wanted
from .precision import resolve_precision
from .tokenizer import load_tokenizer
from .ul2 import batch_loss

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
LATEST = "latest"


class NonFiniteLossError(RuntimeError):
    """The loss or gradient went NaN/Inf for too many consecutive steps."""


@dataclass
class StepStats:
    """One train-local step's loss, throughput and norm."""
    step: int  # 1-based number of optimizer steps done after this one
    loss: float  # mean per-sequence UL2 loss of the global batch
    lr: float
    grad_norm: float
    tokens: int  # input tokens processed in the step
    target_tokens: int
    seconds: float
    skipped: bool = False
    modes: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class LocalTrainer:
    """Gradient accumulation to the global batch, AdamW on fp32 master weights, clipping,
    warmup/decay, autocast, checkpoint + exact resume, export.

    Data come from `step_micro_batches`, the same canonical order the swarm's ledger uses.
    """

    def __init__(self, run: RunConfig, out_dir: str | Path, device: str = "cpu", ul2: bool = True,
                 max_bad_steps: int = 3):
        self.run = run
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        self.precision = resolve_precision(run.train.precision, self.device)
        self.tokenizer = load_tokenizer(run.data.tokenizer)
        self.builder = MicroBatchBuilder(run, ul2=ul2)
        self.model_config = model_config_for(run.model.source, run.model.attn_implementation)
        self.spec = StageSpec(0, self.model_config.n_layer, embed=True, head=True)
        self.model = load_stage(run.model.source, self.spec, dtype=torch.float32, device=self.device,
                                attn_implementation=run.model.attn_implementation)
        self.model.checkpoint_segment = run.pipeline.checkpoint_segment  # the same memory trade as a stage
        self.optimizer = build_optimizer(self.model.parameters(), run.optim)
        train = run.train
        self.scaler = self.precision.grad_scaler(scaling_wanted(train.loss_scaling, train.precision, {self.precision.name}),
                                                 train.loss_scale_init, train.loss_scale_growth_every)
        self.step = 0
        self.history: list[dict] = []
        self.max_bad_steps = max_bad_steps
        self._bad_steps = 0

    # -- training ----------------------------------------------------------------------
    def train_step(self) -> StepStats:
        """One optimizer step over the global batch (micro-batches accumulated)."""
        t0 = time.perf_counter()
        self.model.train()
        train = self.run.train
        total_loss, tokens, targets, modes = 0.0, 0, 0, {}
        for ref in step_micro_batches(self.step, train, self.run.data.num_shards):
            mb = self.builder.build(ref)
            ids, labels = mb.input_ids.to(self.device), mb.labels.to(self.device)
            with self.precision.autocast():
                logits = self.model(ids, mb.prefix_lengths.to(self.device))  # (B, T, V)
            loss = batch_loss(logits, labels, train.global_batch)
            self.scaler.scale(loss).backward()
            total_loss += float(loss.detach())
            tokens += ids.numel()
            targets += mb.target_tokens
            for m in mb.modes:
                modes[m] = modes.get(m, 0) + 1
        lr = lr_at(self.step, self.run.optim, train.steps)
        set_lr(self.optimizer, lr)
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.model.parameters(), self.run.optim.grad_clip)
        skipped = not (math.isfinite(total_loss) and math.isfinite(grad_norm))
        if skipped and not self.scaler.is_enabled():
            self._bad_steps += 1
            log.warning("step %d: non-finite loss %s / grad norm %s; update skipped",
                        self.step, total_loss, grad_norm)
            if self._bad_steps >= self.max_bad_steps:
                raise NonFiniteLossError(
                    f"loss or gradients were NaN/Inf for {self._bad_steps} consecutive steps "
                    f"(last at step {self.step}); lower optim.lr or use precision fp32/bf16")
        else:
            self._bad_steps = 0
            # A loss scaler (fp16) skips the update itself on inf/NaN and lowers the scale.
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        stats = StepStats(self.step, total_loss, lr, grad_norm, tokens, targets,
                          time.perf_counter() - t0, skipped, modes)
        self.history.append({"step": stats.step, "loss": stats.loss, "lr": lr, "grad_norm": grad_norm,
                             "tokens": tokens, "tokens_per_s": stats.tokens_per_s, "skipped": skipped})
        return stats

    def fit(self, steps: int | None = None, progress: bool = True) -> list[StepStats]:
        """Train until `steps` total optimizer steps (default: run.train.steps), checkpointing."""
        target = steps if steps is not None else self.run.train.steps
        every = self.run.train.checkpoint_every
        done: list[StepStats] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=target, initial=self.step, desc=self.run.name, unit="step", dynamic_ncols=True)
        try:
            while self.step < target:
                stats = self.train_step()
                done.append(stats)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{stats.tokens_per_s:,.0f}",
                                    lr=f"{stats.lr:.1e}")
                elif self.step % self.run.train.log_every == 0 or self.step == target:
                    log.info("step %d/%d: loss %.4f, %.0f tokens/s, lr %.2e, grad norm %.3f", self.step, target,
                             stats.loss, stats.tokens_per_s, stats.lr, stats.grad_norm)
                self._append_metrics(stats)
                if every and self.step % every == 0 and self.step < target:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        self.save_checkpoint()
        return done

    def _append_metrics(self, stats: StepStats) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(self.history[-1]) + "\n")

    # -- checkpoints -------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Weights as a HF checkpoint (loadable by load_stage) + optimizer/scaler/step state.

        Written to a temporary directory and renamed, then `latest` is updated: a crash
        mid-save leaves the previous checkpoint intact.
        """
        final = self.checkpoint_root / f"step-{self.step:07d}"
        tmp = self.checkpoint_root / f".tmp-step-{self.step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_checkpoint(self.model.state_dict(), hf_config_dict(self.model_config, torch.float32), tmp)
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(), "history": self.history,
                    "bad_steps": self._bad_steps, "run": self.run.to_dict()}, tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (self.checkpoint_root / LATEST).write_text(final.name)
        return final

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoint_root / LATEST
        if not pointer.is_file():
            return None
        path = self.checkpoint_root / pointer.read_text().strip()
        return path if (path / STATE_FILE).is_file() else None

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Restore weights, optimizer, scaler and step; returns the step resumed at (0: none)."""
        path = Path(checkpoint) if checkpoint is not None else self.latest_checkpoint()
        if path is None:
            return 0
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a trainer checkpoint (no {STATE_FILE}); pass a "
                                    f"directory under {self.checkpoint_root}")
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        self.model = load_stage(str(path), self.spec, dtype=torch.float32, device=self.device,
                                attn_implementation=self.run.model.attn_implementation)
        self.optimizer = build_optimizer(self.model.parameters(), self.run.optim)
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self._bad_steps = int(state.get("bad_steps", 0))
        return self.step

    def export(self, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
        """A Hugging Face checkpoint + tokenizer of the current weights."""
        return export_checkpoint([self.model.state_dict()], self.model_config, out_dir,
                                 tokenizer=self.tokenizer, dtype=dtype)
