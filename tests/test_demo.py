"""``fairtune demo`` end to end at toy scale: trains both arms, compares five methods, resumes."""

import json

from fairtune.cli import main


def test_demo_end_to_end_and_resume(digits_dir, judges_dir, tmp_path):
    from fairtune.models import train_attribute_classifier

    clf = tmp_path / "clf"
    train_attribute_classifier(digits_dir, clf, epochs=1)
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out", str(out),
        "--steps", "2",
        "--n_per_prompt", "4",
        "--sampling_steps", "2",
        "--paraphrase_digits", "[3]",
        "--data", str(digits_dir),
        "--judges", str(judges_dir),
        "--classifier", str(clf),
    ]  # fmt: skip
    main(args)
    metrics = json.loads((out / "compare" / "metrics.json").read_text())
    methods = metrics["methods"] if "methods" in metrics else metrics
    names = set(methods) if isinstance(methods, dict) else {m["name"] for m in methods}
    assert {"base", "naive", "debiased", "fair_diffusion", "prompt_augmentation"} <= names
    for arm in ("naive", "all"):
        assert (out / arm / "adapter" / "pytorch_lora_weights.safetensors").exists()
        assert json.loads((out / arm / "finished.json").read_text())["steps"] == 2
    assert (out / "compare" / "report.html").stat().st_size > 0
    timing = json.loads((out / "demo.json").read_text())
    assert timing["train_all_s"] > 0

    # Started again, the finished trainings are skipped (their adapters untouched).
    before = (out / "all" / "adapter" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    main(args)
    assert (out / "all" / "adapter" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == before
