"""Audits during training (issue 16): every k steps the run generates a small batch per prompt with its
current weights, a judge (the benchmark's colour CNN) places each image, and the mix against the target
goes to DIR/audit/audit.csv, the loggers (CSV, TensorBoard) and a plot; a collapsing run can be stopped."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from test_distributed import tiny_base, tiny_config  # noqa: F401 - tiny_base is a fixture

from fairtune.cli import main
from fairtune.models import Backbone, BackboneConfig, ClassifierConfig, load_adapter, load_classifier

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PROMPTS = {
    "digit 0": "a handwritten digit 0",
    "digit 5": "a handwritten digit 5",
    "digit 7": "a handwritten digit 7",
}


JUDGE_ARGS = {"num_classes": 2, "width": 4, "feature_dim": 8}


@pytest.fixture(scope="module")
def color_judge_dir(digits_dir, tmp_path_factory):
    """A small colour judge (the shipped judges' colour CNN at a quarter of the width), trained on
    1,024 held-out renders in a few seconds; saved as ``color_cnn.safetensors`` like the real ones."""
    from safetensors.torch import save_file

    from fairtune.colored_digits import SmallCNN
    from fairtune.data import images_from_table, load_table

    held = load_table(str(digits_dir / "table"), split="heldout").shuffle(seed=0).select(range(1024))
    x = images_from_table(held)
    y = torch.tensor([["red", "blue"].index(c) for c in held["color"]])
    torch.manual_seed(0)
    model = SmallCNN(**JUDGE_ARGS)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(3):
        for i in range(0, len(x), 64):
            loss = torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.95  # it does judge the colour
    out = tmp_path_factory.mktemp("judge")
    save_file(model.state_dict(), str(out / "color_cnn.safetensors"))
    return out


def test_the_shipped_overlay_fits_the_shipped_judges():
    from fairtune.colored_digits import JudgeTrainConfig

    cfg = yaml.safe_load((CONFIGS / "colored_digits" / "audit.yaml").read_text())
    judge = cfg["trainer"]["callbacks"][0]["init_args"]["judge"]
    # `fairtune judges train` builds its colour CNN at half the digit CNN's width (colored_digits/_judges.py)
    jt = JudgeTrainConfig()
    assert judge["init_args"] == {
        "num_classes": 2,
        "width": jt.width // 2,
        "feature_dim": jt.feature_dim // 2,
    }
    assert judge["weights"].endswith("color_cnn.safetensors")


def _overlay(path: Path, color_judge_dir: Path, **init) -> Path:
    """The shipped overlay, pointed at the test's judge and sized for a CPU test."""
    cfg = yaml.safe_load((CONFIGS / "colored_digits" / "audit.yaml").read_text())
    args = cfg["trainer"]["callbacks"][0]["init_args"]
    args["judge"]["weights"] = str(color_judge_dir / "color_cnn.safetensors")
    args["judge"]["init_args"] = dict(JUDGE_ARGS)
    args.update({"every_n_steps": 2, "n_per_prompt": 4, "steps": 2, **init})
    path.write_text(yaml.safe_dump(cfg))
    return path


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_audit_logs_the_mix_every_k_steps_and_matches_the_exported_adapter(
    digits_dir,
    color_judge_dir,
    tiny_base,  # noqa: F811
    tmp_path,
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = tiny_config(digits_dir, tiny_base, tmp_path / "fit.yaml", **{"data.rebalance": {}})
    overlay = _overlay(tmp_path / "audit.yaml", color_judge_dir, prompts=PROMPTS)
    main(["fit", "--config", str(cfg), "--config", str(CONFIGS / "launch" / "tensorboard.yaml"),
          "--config", str(overlay), "--samples.every_n_steps", "null",
          "--trainer.default_root_dir", str(run)])  # fmt: skip

    rows = _csv(run / "audit" / "audit.csv")
    assert [(int(r["step"]), r["concept"]) for r in rows] == [(s, c) for s in (0, 2, 4) for c in PROMPTS]
    for r in rows:
        red, blue = float(r["share/red"]), float(r["share/blue"])
        assert int(r["n"]) == 4 and int(r["undetermined"]) == 0
        assert red + blue == pytest.approx(1.0) and red * 4 == pytest.approx(round(red * 4))
        assert float(r["target/red"]) == float(r["target/blue"]) == 0.5  # the run's uniform target
        assert float(r["gap"]) == pytest.approx(abs(red - 0.5))
        assert float(r["seconds"]) > 0
    png = (run / "audit" / "shares.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # the loggers: TensorBoard scalars and the plot, and the run's CSV log
    events = next((run / "tensorboard" / "version_0").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in acc.Scalars("audit/mean_gap")] == [0, 2, 4]
    assert [e.step for e in acc.Scalars("audit/seconds")] == [0, 2, 4]
    last = {r["concept"]: r for r in rows if r["step"] == "4"}
    assert acc.Scalars("audit/digit 5/red")[-1].value == pytest.approx(float(last["digit 5"]["share/red"]))
    assert [e.step for e in acc.Images("audit/shares")] == [0, 2, 4]
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("audit/mean_gap")]
    assert [int(r["step"]) for r in logged] == [0, 2, 4]

    # The last audit judged what the exported adapter generates: same prompts, seeds and steps.
    bb = load_adapter(
        Backbone.from_config(BackboneConfig(kind="tiny", pretrained=str(tiny_base))), run / "adapter"
    )
    judge = load_classifier(ClassifierConfig(**yaml.safe_load(overlay.read_text())["trainer"]["callbacks"][0]
                                             ["init_args"]["judge"]))  # fmt: skip
    prompts = [p for p in PROMPTS.values() for _ in range(4)]
    with torch.no_grad():
        images = bb.sample(prompts, seeds=[0, 1, 2, 3] * len(PROMPTS), steps=2, guidance_scale=2.0)
        labels = judge(images).argmax(1).view(len(PROMPTS), 4)
    for i, concept in enumerate(PROMPTS):
        assert float(last[concept]["share/red"]) == pytest.approx((labels[i] == 0).float().mean().item())


@pytest.mark.slow  # two trainings with audits (about 25 s on 2 idle cores)
def test_a_collapsing_run_is_stopped_and_a_resumed_run_keeps_its_history(
    digits_dir,
    color_judge_dir,
    tiny_base,  # noqa: F811
    tmp_path,
):
    run = tmp_path / "run"
    cfg = tiny_config(digits_dir, tiny_base, tmp_path / "fit.yaml", **{"trainer.max_steps": 8})
    # an odd number of images: a share is never exactly 1/2, so every gap is above 0
    overlay = _overlay(tmp_path / "audit.yaml", color_judge_dir, prompts=PROMPTS, n_per_prompt=3,
                       stop_gap=0.0, stop_patience=2)  # fmt: skip
    args = ["fit", "--config", str(cfg), "--config", str(overlay), "--trainer.default_root_dir", str(run)]
    main(args)
    steps = [int(r["step"]) for r in _csv(run / "audit" / "audit.csv")]
    assert sorted(set(steps)) == [0, 2, 4]  # stopped after the second audit above the gap, not at step 8
    # the same command without the stop resumes from step 4: no second audit of step 4, history kept
    main([*args, "--trainer.callbacks.init_args.stop_gap", "null"])
    steps = [int(r["step"]) for r in _csv(run / "audit" / "audit.csv")]
    assert steps == [s for s in (0, 2, 4, 6, 8) for _ in PROMPTS]


def test_audit_costs_are_bounded_and_its_judge_is_independent(
    digits_dir,
    color_judge_dir,
    tiny_base,  # noqa: F811
    tmp_path,
):
    cfg = tiny_config(digits_dir, tiny_base, tmp_path / "fit.yaml", **{"trainer.max_steps": 1})
    big = _overlay(tmp_path / "big.yaml", color_judge_dir, n_per_prompt=200, max_images=512)
    with pytest.raises(
        ValueError, match=r"8 prompts x n_per_prompt=200 = 1600 images per audit exceeds audit.max_images=512"
    ):
        main(
            [
                "fit",
                "--config",
                str(cfg),
                "--config",
                str(big),
                "--trainer.default_root_dir",
                str(tmp_path / "a"),
            ]
        )
    weights = str(color_judge_dir / "color_cnn.safetensors")
    same = tiny_config(
        digits_dir, tiny_base, tmp_path / "fair.yaml",
        **{"trainer.max_steps": 1,
           "model.fairness": {"classifier": {"module": "fairtune.colored_digits.SmallCNN", "weights": weights,
                                             "init_args": JUDGE_ARGS}}},
    )  # fmt: skip
    with pytest.raises(ValueError, match="is the fairness loss's classifier"):
        main(["fit", "--config", str(same), "--config", str(_overlay(tmp_path / "o.yaml", color_judge_dir)),
              "--trainer.default_root_dir", str(tmp_path / "b")])  # fmt: skip
