"""Where a run's numbers go: metrics.jsonl, TensorBoard, W&B (if asked), and the progress line.

    writer = MetricsWriter(workdir, total_steps, start_step, use_wandb=False)
    writer.train(step, {"loss": ..., "learning_rate": ..., "tokens_per_second": ...})
    writer.eval(step, {"eval_loss": ...})
    writer.close()

metrics.jsonl holds one JSON object per logged row (contract: `step`, `loss`, `learning_rate`,
`tokens_per_second` on train rows; `eval_loss` on eval rows). On a terminal a tqdm bar shows step,
loss, learning rate, tokens/s, MFU (when the device's peak is known) and ETA; elsewhere (CI, logs)
plain lines are printed every `print_every` steps. Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

import jax

log = logging.getLogger("jaxft.metrics")

# Dense bf16 peak FLOP/s per chip, for MFU (DESIGN.md: MFU = model FLOP/s ÷ peak).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}


def device_peak_flops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def model_flops_per_token(num_params: int, num_layers: int, hidden: int, seq_len: int, trainable_params: int | None = None) -> float:
    """Training FLOPs per token (DESIGN.md): full FT 6·N, LoRA ≈ 4·N (no weight gradients for the
    frozen base) + 6·N_adapter, plus attention 12·L·d·T halved for causal masking. Remat not counted."""
    attention = 12 * num_layers * hidden * seq_len / 2
    if trainable_params is None or trainable_params >= num_params:
        return 6 * num_params + attention
    return 4 * num_params + 6 * trainable_params + attention


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, *, flops_per_token: float | None = None,
                 use_wandb: bool = False, wandb_project: str = "jaxft", config: dict | None = None,
                 print_every: int = 10, show_progress: bool | None = None):
        self.active = jax.process_index() == 0
        self.total, self.start_step, self.print_every = total_steps, start_step, print_every
        self.peak = device_peak_flops() if flops_per_token else None
        self.flops_per_token = flops_per_token
        self.started = time.perf_counter()
        self.jsonl = self.tensorboard = self.wandb = self.bar = None
        if not self.active:
            return
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            log.warning("tensorboardX is not installed: no TensorBoard events (pip install tensorboardX)")
        if use_wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, config=config, dir=workdir, resume="allow")
            except ImportError:
                log.warning("config asks for W&B, but wandb is not installed: skipped")
        if show_progress if show_progress is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def train(self, step: int, row: dict[str, Any]) -> None:
        row = {"step": step, **row}
        if self.peak and "tokens_per_second" in row:
            row["mfu"] = row["tokens_per_second"] * self.flops_per_token / self.peak
        self._emit(step, row)
        if not self.active:
            return
        done = step - self.start_step
        eta = (time.perf_counter() - self.started) / max(done, 1) * (self.total - step)
        summary = (f"loss {row['loss']:.4f}  lr {row['learning_rate']:.2e}  {row['tokens_per_second']:,.0f} tok/s"
                   + (f"  MFU {row['mfu']:.1%}" if "mfu" in row else "") + f"  ETA {_duration(eta)}")
        if self.bar is not None:
            self.bar.set_postfix_str(summary, refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.print_every == 0 or step == self.total or done == 1:
            print(f"step {step}/{self.total}  {summary}", flush=True)

    def eval(self, step: int, row: dict[str, Any]) -> None:
        self._emit(step, {"step": step, **row})
        if self.active:
            message = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            (self.bar.write if self.bar is not None else print)(f"step {step}/{self.total}  {message}")

    def _emit(self, step: int, row: dict[str, Any]) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                if self.tensorboard is not None:
                    self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        for closer in (self.bar, self.tensorboard, self.jsonl):
            if closer is not None:
                closer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def matmul_flops(jaxpr) -> float:
    """FLOPs of the matrix products a traced program runs (`jax.make_jaxpr(f)(...).jaxpr`): 2·M·N·K
    per dot_general, a scan's body counted once per iteration (XLA's cost analysis counts a loop
    body once, whatever its trip count), sub-programs (jit, remat, custom VJPs) included."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in _subjaxprs(eqn):
            total += times * matmul_flops(sub)
    return total


def _subjaxprs(eqn):
    from jax.extend import core as jax_core

    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else [value]:
            if isinstance(v, jax_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax_core.Jaxpr):
                yield v
