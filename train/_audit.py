"""Audits during training: every k steps, a small judged batch per prompt, its mix against the target.

:class:`TrainingAudit` is a Lightning callback. Every ``every_n_steps`` optimizer steps (and at the start
and the end of the run) it generates ``n_per_prompt`` images for each audited prompt with the weights the
run would export (EMA when on), image ``i`` from seed ``seed + i`` (the seeds ``fairtune audit`` uses),
has a frozen attribute classifier (the judge; never the fairness loss's classifier) place each image in
a target group, and records each concept's judged mix against its target:

- ``DIR/audit/audit.csv``: one row per audit and concept (step, shares, targets, gap, seconds);
- the trainer's loggers (CSV, TensorBoard, wandb): ``audit/<concept>/<group>``, ``audit/<concept>/gap``,
  ``audit/mean_gap``, ``audit/seconds`` (the audit's wall time), and the plot as an image;
- ``DIR/audit/shares.png``: each concept's share of each group against the step, with the target as a
  dashed line.

Its cost is bounded by config: prompts × ``n_per_prompt`` images (at most ``max_images``) of ``steps``
DDIM steps every ``every_n_steps`` steps. With ``stop_gap`` set, a run whose mean gap stays above it for
``stop_patience`` audits in a row is stopped (a collapsing run).

Use it from ``fairtune fit`` with a ``trainer.callbacks`` entry (see ``configs/colored_digits/audit.yaml``).
"""

from __future__ import annotations

import csv
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from fairtune.data import atomic_path, deviation, proportions
from fairtune.models import ClassifierConfig, judged_labels, load_classifier

from ._monitors import step_is_due

CSV_NAME = "audit.csv"
PLOT_NAME = "shares.png"


class TrainingAudit(L.Callback):
    """Judged attribute mix per concept every k optimizer steps, against the target.

    Args:
        judge: The attribute classifier that judges the images (a ``torch.nn.Module`` class, its
            init args and safetensors weights; input ``pixels`` in [0, 1]). Never the one the fairness
            loss trains against.
        classes: The judge's class names in the order of its outputs; ``None``: the target's groups.
        every_n_steps: Audit every n optimizer steps (and at the end); ``None``: only at the start/end.
        at_start: Also audit before the first step (the base line the mix moves from).
        prompts: Concept -> prompt; ``None``: ``template`` filled with ``concepts``.
        template: Prompt of a concept, e.g. ``"a handwritten {concept}"``.
        concepts: Concepts to audit; ``None``: the data module's concepts (sorted).
        max_prompts: At most this many prompts.
        n_per_prompt: Images per prompt per audit.
        steps: DDIM steps per image.
        guidance_scale: Classifier-free guidance scale.
        seed: Image ``i`` of every prompt is generated from seed ``seed + i``.
        batch_size: Images per sampling batch.
        min_confidence: An image whose top judge probability is below this is undetermined (counted,
            not placed).
        max_images: Upper bound on prompts × ``n_per_prompt`` (the cost of one audit).
        stop_gap: Stop training when the mean gap (over concepts, of max |share − target|) is above this
            for ``stop_patience`` audits in a row (after step 0); ``None``: never stop.
        stop_patience: Audits in a row above ``stop_gap`` that stop the run.
        folder: Sub-folder of the run folder for the CSV and the plot.
    """

    def __init__(
        self,
        judge: ClassifierConfig,
        classes: list[str] | None = None,
        every_n_steps: int | None = 100,
        at_start: bool = True,
        prompts: dict[str, str] | None = None,
        template: str = "{concept}",
        concepts: list[str] | None = None,
        max_prompts: int = 8,
        n_per_prompt: int = 16,
        steps: int = 10,
        guidance_scale: float = 2.0,
        seed: int = 0,
        batch_size: int = 256,
        min_confidence: float = 0.0,
        max_images: int = 512,
        stop_gap: float | None = None,
        stop_patience: int = 2,
        folder: str = "audit",
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"audit.every_n_steps must be >= 1 or null, got {every_n_steps}")
        for name, v in (("n_per_prompt", n_per_prompt), ("max_prompts", max_prompts), ("steps", steps),
                        ("batch_size", batch_size), ("max_images", max_images),
                        ("stop_patience", stop_patience)):  # fmt: skip
            if v < 1:
                raise ValueError(f"audit.{name} must be >= 1, got {v}")
        if judge.input != "pixels":
            raise ValueError(
                f"audit.judge.input must be 'pixels' to judge generated images, got {judge.input!r}"
            )
        if "{concept}" not in template and prompts is None:
            raise ValueError(f"audit.template needs a {{concept}} field, got {template!r}")
        self.judge = judge
        self.classes = classes
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self.prompts = prompts
        self.template = template
        self.concepts = concepts
        self.max_prompts = max_prompts
        self.n_per_prompt = n_per_prompt
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.batch_size = batch_size
        self.min_confidence = min_confidence
        self.max_images = max_images
        self.stop_gap = stop_gap
        self.stop_patience = stop_patience
        self.folder = folder
        self._model: torch.nn.Module | None = None
        self._entries: list[tuple[str, str]] = []
        self._groups: list[str] = []
        self._to_group: list[int] = []
        self._history: list[dict] = []
        self._last_step: int | None = None
        self._above = 0

    # ------------------------------------------------------------------------------------ set-up
    def _dir(self, trainer) -> Path:
        return Path(trainer.default_root_dir) / self.folder

    def _resolve_entries(self, trainer) -> list[tuple[str, str]]:
        if self.prompts:
            pairs = list(self.prompts.items())
        else:
            concepts = self.concepts
            if concepts is None:
                dm = getattr(trainer, "datamodule", None)
                concepts = sorted(set(getattr(dm, "record_concepts", None) or []))
            if not concepts:
                raise ValueError("audit: no prompts, no concepts, and the data module names no concepts")
            pairs = [(c, self.template.format(concept=c)) for c in concepts]
        return pairs[: self.max_prompts]

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._entries = self._resolve_entries(trainer)
        n = len(self._entries) * self.n_per_prompt
        if n > self.max_images:
            raise ValueError(
                f"audit: {len(self._entries)} prompts x n_per_prompt={self.n_per_prompt} = {n} images per "
                f"audit exceeds audit.max_images={self.max_images}; lower n_per_prompt or max_prompts"
            )
        fairness = getattr(pl_module, "fairness", None)
        if fairness is not None and os.path.abspath(fairness.classifier.weights) == os.path.abspath(
            self.judge.weights
        ):
            raise ValueError(
                "audit.judge.weights is the fairness loss's classifier: the model trains against it, so it "
                "cannot judge the result; give the audit an independent judge"
            )
        self._model = load_classifier(self.judge, what="audit.judge")

    def _target(self, trainer, pl_module):
        dm = getattr(trainer, "datamodule", None)
        target = getattr(dm, "target", None) or getattr(pl_module, "target", None)
        if target is None:
            raise ValueError("audit: the run has no target (data.target) to compare the mix with")
        return target

    def _mapping(self, target) -> list[int]:
        classes = list(self.classes) if self.classes is not None else list(target.groups)
        missing = [c for c in classes if c not in target.groups]
        if missing:
            raise ValueError(f"audit.classes {missing} are not groups of the target {list(target.groups)}")
        return [target.groups.index(c) for c in classes]

    def on_train_start(self, trainer, pl_module) -> None:
        target = self._target(trainer, pl_module)
        self._groups = list(target.groups)
        self._to_group = self._mapping(target)
        self._history = self._read_csv(self._dir(trainer) / CSV_NAME)
        if self._history:
            self._last_step = max(r["step"] for r in self._history)
        if self.at_start and self._last_step != trainer.global_step:
            self.audit(trainer, pl_module)

    # ------------------------------------------------------------------------------------ the audit
    @torch.no_grad()
    def judge_images(self, images: torch.Tensor, device) -> np.ndarray:
        """Target-group index per image (``-1``: undetermined)."""
        model = self._model.to(device)
        labels = []
        for i in range(0, len(images), self.batch_size):
            label = judged_labels(
                model(images[i : i + self.batch_size].to(device)), temperature=self.judge.temperature,
                min_confidence=self.min_confidence, n_classes=len(self._to_group),
                what=f"audit.judge ({self.judge.module})",
            )  # fmt: skip
            group = torch.tensor(self._to_group, device=label.device)[label.clamp(min=0)]
            labels.append(torch.where(label >= 0, group, torch.full_like(group, -1)).cpu())
        return torch.cat(labels).numpy()

    def audit(self, trainer, pl_module) -> list[dict]:
        """Audit now (every rank generates and judges the same images; rank zero writes and logs).

        Returns:
            One row per concept: step, concept, prompt, n, undetermined, ``share/<group>``,
            ``target/<group>``, gap, seconds.
        """
        step = trainer.global_step
        self._last_step = step
        target = self._target(trainer, pl_module)
        t0 = time.perf_counter()
        prompts = [p for _, p in self._entries for _ in range(self.n_per_prompt)]
        seeds = [self.seed + i for _ in self._entries for i in range(self.n_per_prompt)]
        ema = getattr(pl_module, "ema_weights", None)
        with torch.no_grad(), ema() if callable(ema) else nullcontext():
            images = pl_module.backbone.sample(
                prompts, seeds=seeds, steps=self.steps, guidance_scale=self.guidance_scale,
                batch_size=self.batch_size,
            )  # fmt: skip
        labels = self.judge_images(images, pl_module.device)
        seconds = time.perf_counter() - t0
        k, n = len(self._groups), self.n_per_prompt
        rows = []
        for b, (concept, prompt) in enumerate(self._entries):
            q = np.asarray(target.proportions(concept), dtype=np.float64)
            share, placed, undetermined = proportions(labels[b * n : (b + 1) * n], num_classes=k)
            row = {"step": step, "concept": concept, "prompt": prompt, "n": n, "undetermined": undetermined}
            row.update({f"share/{g}": float(s) for g, s in zip(self._groups, share)})
            row.update({f"target/{g}": float(t) for g, t in zip(self._groups, q)})
            row["gap"] = deviation(share, target=q) if placed else float("nan")
            row["seconds"] = seconds
            rows.append(row)
        self._history += rows
        gaps = [r["gap"] for r in rows if not math.isnan(r["gap"])]
        mean_gap = float(np.mean(gaps)) if gaps else float("nan")
        if trainer.is_global_zero:
            self._write(trainer, rows, mean_gap, seconds, step)
        if self.stop_gap is not None and step > 0:
            self._above = self._above + 1 if mean_gap > self.stop_gap else 0
            if self._above >= self.stop_patience:
                trainer.should_stop = True
                rank_zero_info(
                    f"audit: mean gap {mean_gap:.3f} > stop_gap {self.stop_gap} for {self._above} audits in "
                    f"a row at step {step}; stopping the run"
                )
        return rows

    # ------------------------------------------------------------------------------------ outputs
    def _fieldnames(self) -> list[str]:
        return (
            ["step", "concept", "prompt", "n", "undetermined"]
            + [f"share/{g}" for g in self._groups]
            + [f"target/{g}" for g in self._groups]
            + ["gap", "seconds"]
        )

    @staticmethod
    def _read_csv(path: Path) -> list[dict]:
        if not path.is_file():
            return []
        out = []
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                row = {k: (v if k in ("concept", "prompt") else float(v) if v != "" else float("nan"))
                       for k, v in r.items()}  # fmt: skip
                row["step"], row["n"], row["undetermined"] = (
                    int(row["step"]),
                    int(row["n"]),
                    int(row["undetermined"]),
                )
                out.append(row)
        return out

    def _write(self, trainer, rows: list[dict], mean_gap: float, seconds: float, step: int) -> None:
        folder = self._dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CSV_NAME
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fieldnames())
            if new:
                w.writeheader()
            w.writerows(rows)
        img = self.plot(folder / PLOT_NAME)
        metrics = {"audit/mean_gap": mean_gap, "audit/seconds": seconds}
        for r in rows:
            c = r["concept"]
            metrics[f"audit/{c}/gap"] = r["gap"]
            for g in self._groups:
                metrics[f"audit/{c}/{g}"] = r[f"share/{g}"]
        metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}
        self._log(trainer, metrics, img, step)
        rank_zero_info(
            f"audit at step {step}: mean gap {mean_gap:.3f} over {len(rows)} concepts "
            f"({len(rows) * self.n_per_prompt} images, {seconds:.1f} s)"
        )

    def plot(self, path: Path) -> np.ndarray:
        """Each concept's share of each group vs step (solid) and its target (dashed); returns the RGB
        array of the figure (also written to ``path`` atomically)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        concepts = list(dict.fromkeys(r["concept"] for r in self._history))
        cols = min(4, len(concepts))
        rows_n = -(-len(concepts) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.6 * rows_n), squeeze=False, sharey=True)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, concept in zip(axes.flat, concepts):
            hist = sorted((r for r in self._history if r["concept"] == concept), key=lambda r: r["step"])
            steps = [r["step"] for r in hist]
            for i, g in enumerate(self._groups):
                # a group named after a colour is drawn in it (e.g. an ink-colour attribute)
                col = g if matplotlib.colors.is_color_like(g) else colors[i % len(colors)]
                ax.plot(steps, [r[f"share/{g}"] for r in hist], "o-", color=col, ms=3, label=g)
                ax.plot(steps, [r[f"target/{g}"] for r in hist], "--", color=col, lw=1)
            ax.set_title(concept, fontsize=9)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(concepts) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        for ax in axes[-1]:
            ax.set_xlabel("step")
        for ax in axes[:, 0]:
            ax.set_ylabel("judged share")
        fig.suptitle("audit during training: judged share (solid) vs target (dashed)", fontsize=10)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
        fig.canvas.draw()
        rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        return rgb

    @staticmethod
    def _log(trainer, metrics: dict, img: np.ndarray, step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, WandbLogger):
                from PIL import Image

                logger.log_image(key="audit/shares", images=[Image.fromarray(img)], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("audit/shares", img, global_step=step, dataformats="HWC")

    # ------------------------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if step_is_due(trainer, batch_idx, self.every_n_steps, self._last_step):
            self.audit(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self.audit(trainer, pl_module)
