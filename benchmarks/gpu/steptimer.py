"""A Lightning callback for .gpu/run.sh: per-step wall times of a `fairtune fit` run, written as JSON."""

import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch


class StepTimer(pl.Callback):
    """Record the wall time of every training step (CUDA synchronised) and write a summary at the end.

    Args:
        out: JSON file to write.
        warmup: Steps left out of the steady-state rate.
    """

    def __init__(self, out: str, warmup: int = 20):
        self.out, self.warmup, self.t = Path(out), warmup, []

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self.t = [self._now()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.t.append(self._now())

    def on_train_end(self, trainer, pl_module):
        d = [b - a for a, b in zip(self.t, self.t[1:])]
        steady = d[self.warmup :] if len(d) > self.warmup else d
        steady_sorted = sorted(steady)
        summary = {
            "batches": len(d),
            "global_step": trainer.global_step,
            "train_loop_s": self.t[-1] - self.t[0] if d else 0.0,
            "first_step_s": d[0] if d else None,
            "median_step_s": steady_sorted[len(steady_sorted) // 2] if steady else None,
            "steady_steps_per_s": len(steady) / sum(steady) if steady and sum(steady) > 0 else None,
            "warmup_steps_excluded": min(self.warmup, len(d)) if len(d) > self.warmup else 0,
            "peak_cuda_mem_gb": (
                torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            ),
        }
        self.out.write_text(json.dumps(summary, indent=2))
