import pytest
import yaml

from fairtune.models import add_audit_to_model_card, audit_section, write_model_card

CARD = dict(
    base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
    kind="sd",
    target={"attributes": ["gender"], "proportions": "uniform"},
    levers={"sampler": None, "adversary": None, "fairness": {"weight": 0.5}},
    steps=1000,
    lora={"rank": 50},
    extra={"learning rate": 5e-5},
)

METRICS = {
    "attribute": "gender",
    "classes": ["male", "female"],
    "judges": "CLIP zero-shot (`clip-b`)",
    "methods": {
        "base": {"kind": "base", "summary": {"mean_dev_seen": 0.41, "fidelity": None}},
        "debiased": {"kind": "adapter", "summary": {"mean_dev_seen": 0.12, "fidelity": None}},
    },
}


def test_model_card_front_matter_training_table_and_audit(tmp_path):
    path = write_model_card(tmp_path / "adapter", **CARD)
    text = path.read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == CARD["base_model"] and front["library_name"] == "diffusers"
    assert "stable-diffusion" in front["tags"] and "lora" in front["tags"]
    assert "| levers | fairness |" in text and "| steps | 1000 |" in text
    assert "pipe.load_lora_weights" in text and "No audit recorded yet" in text

    add_audit_to_model_card(tmp_path / "adapter", METRICS, command="fairtune audit --model sd ...")
    text = path.read_text()
    assert "No audit recorded yet" not in text
    row = next(line for line in text.splitlines() if line.startswith("| mean deviation from target, seen"))
    assert row == "| mean deviation from target, seen concepts | 0.120 | 0.410 |"
    assert "fidelity" not in text.split("## Audit")[1]  # n/a for every method: no row
    assert "Measured with: `fairtune audit --model sd ...`" in text
    # a re-export (e.g. at the next checkpoint) keeps the recorded audit
    write_model_card(tmp_path / "adapter", **{**CARD, "steps": 2000})
    text = path.read_text()
    assert "| steps | 2000 |" in text and "0.120" in text


def test_audit_section_errors_and_cards_it_does_not_own(tmp_path):
    with pytest.raises(ValueError, match="not in metrics"):
        audit_section(METRICS, method="nope")
    (tmp_path / "README.md").write_text("# someone else's card\n")
    assert add_audit_to_model_card(tmp_path, METRICS) is None
    assert (tmp_path / "README.md").read_text() == "# someone else's card\n"
