"""Any mix after deployment: one adapter per class, drawn per image in solved shares."""

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import judges_args

from fairtune.cli import main
from fairtune.colored_digits import judge_config
from fairtune.eval import (
    CompareConfig,
    GenerationConfig,
    MethodConfig,
    compare_methods,
    expand_mix_request,
    load_prompt_file,
    mix_for,
)
from fairtune.models import ClassAdapterMix

GEN = GenerationConfig(n_per_prompt=8, steps=4, batch_size=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ================================================================================= solving the mix
def test_two_classes_solve_in_closed_form_and_flag_what_is_out_of_reach():
    ends = np.array([[0.9, 0.1], [0.2, 0.8]])  # red adapter alone: 90% red; blue adapter: 20% red
    w, ok = mix_for(ends, np.array([0.5, 0.5]))
    assert ok and w == pytest.approx([(0.5 - 0.2) / 0.7, 1 - (0.5 - 0.2) / 0.7], abs=1e-6)
    assert w @ ends == pytest.approx([0.5, 0.5], abs=1e-6)
    w, ok = mix_for(ends, np.array([0.95, 0.05]))  # beyond the red adapter: the nearest mix, flagged
    assert not ok and w == pytest.approx([1.0, 0.0], abs=1e-6)


def test_three_classes_reach_any_mix_inside_the_adapters_hull():
    ends = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
    for want in ([0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [1 / 3, 1 / 3, 1 / 3]):
        w, ok = mix_for(ends, np.array(want))
        assert ok and w.min() >= 0 and w.sum() == pytest.approx(1)
        assert w @ ends == pytest.approx(want, abs=1e-4)
    assert not mix_for(ends, np.array([0.95, 0.05, 0.0]))[1]


@pytest.mark.parametrize(
    "request_, named",
    [
        ({"digit 11": {"red": 0.7}}, "digit 11"),
        ({"digit 1": {"green": 0.7}}, "green"),
        ({"digit 1": {"red": 1.5}}, "[0, 1]"),
        ({"digit 1": {"red": 0.5, "blue": 0.3}}, "sum"),
        ({}, "empty"),
    ],
)
def test_a_bad_mix_request_names_what_is_wrong(request_, named):
    with pytest.raises(ValueError, match=r"request") as e:
        expand_mix_request(request_, ["digit 1", "digit 9"], ["red", "blue"])
    assert named in str(e.value)


def test_two_classes_need_one_share_three_need_all():
    got = expand_mix_request(
        {"*": {"red": 0.3}, "digit 9": {"blue": 0.9}}, ["digit 1", "digit 9"], ["red", "blue"]
    )
    assert got == {"digit 1": {"red": 0.3, "blue": 0.7}, "digit 9": {"red": pytest.approx(0.1), "blue": 0.9}}
    with pytest.raises(ValueError, match="every class"):
        expand_mix_request({"*": {"red": 0.3}}, ["d"], ["red", "blue", "green"])


# ============================================================================ on the shipped model
@pytest.fixture(scope="module")
def blue_adapter(random_adapter):
    """A second adapter (other random up-projections than ``adapter_dir``)."""
    return random_adapter(1)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "digits.yaml"
    path.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "seen",
                    "template": "a handwritten digit {value}",
                    "values": [1, 9],
                    "concept": "digit {value}",
                },
                {
                    "name": "red",
                    "role": "explicit",
                    "names": "red",
                    "template": "a red handwritten digit {value}",
                    "values": [1, 9],
                    "concept": "digit {value}",
                },
            ]
        )  # fmt: skip
    )
    return path


def test_each_image_is_the_image_its_class_adapter_gives_alone(
    backbone, adapter_dir, blue_adapter, judges_dir, prompts_file
):
    adapters = {"red": str(adapter_dir), "blue": str(blue_adapter)}
    methods = [
        MethodConfig("red_alone", kind="adapter", adapter=adapters["red"]),
        MethodConfig("blue_alone", kind="adapter", adapter=adapters["blue"]),
        MethodConfig(
            "mix", kind="class_adapters", class_adapters=adapters, mix={"*": {"red": 0.25, "blue": 0.75}}
        ),
    ]
    judges = judge_config(judges_dir)
    cfg = CompareConfig(
        methods=methods, prompts=load_prompt_file(prompts_file), backbone=backbone.config, judges=judges,
        generation=GEN,
    )  # fmt: skip
    metrics, images = compare_methods(cfg, backbone=backbone, progress=False)
    mix = metrics["methods"]["mix"]["summary"]
    assert mix["unet_evals_per_image"] == 2 * GEN.steps  # the base model's cost
    from fairtune.eval._config import prompt_entries
    from fairtune.eval._generation import mix_classes
    from fairtune.eval._panel import build_judges, build_target

    target = build_target(cfg.target, build_judges(cfg.judges))
    drawn = mix_classes(methods[2], prompt_entries(cfg.prompts), target, GEN.n_per_prompt)
    per_prompt = np.array(drawn).reshape(-1, GEN.n_per_prompt)
    assert ((per_prompt == "red").sum(axis=1) == 2).all()  # stratified: exactly 25% of each prompt's 8
    for i, c in enumerate(drawn):
        assert torch.allclose(images["mix"][i], images[f"{c}_alone"][i], atol=2e-3), i
    # mixed by the concept's own entry first, then "*"
    mix = {"digit 9": {"red": 1.0, "blue": 0.0}, "*": {"red": 0.0, "blue": 1.0}}
    one = MethodConfig("m", kind="class_adapters", class_adapters=adapters, mix=mix)
    drawn = mix_classes(one, prompt_entries(cfg.prompts), target, GEN.n_per_prompt)
    concepts = [e.concept for e in prompt_entries(cfg.prompts) for _ in range(GEN.n_per_prompt)]
    assert all((c == "red") == (k == "digit 9") for c, k in zip(drawn, concepts))


def test_class_adapters_are_checked_before_any_work(adapter_dir, tmp_path):
    from fairtune.eval._config import validate_methods

    with pytest.raises(FileNotFoundError, match=r"class_adapters\['blue'\]"):
        adapters = {"red": str(adapter_dir), "blue": str(tmp_path)}
        validate_methods([MethodConfig("m", kind="class_adapters", class_adapters=adapters)])
    with pytest.raises(ValueError, match="only it"):
        validate_methods(
            [MethodConfig("m", kind="adapter", adapter=str(adapter_dir), mix={"*": {"red": 1.0}})]
        )


def test_the_mixer_refuses_a_class_without_adapter(backbone, adapter_dir):
    mixer = ClassAdapterMix(backbone, {"red": adapter_dir})
    with pytest.raises(ValueError, match=r"\['blue'\] have no adapter"):
        mixer.sample(["a handwritten digit 1"], seeds=[0], classes=["blue"], steps=2)
    with pytest.raises(ValueError, match="differ"):
        mixer.sample(["a handwritten digit 1"], seeds=[0, 1], classes=["red"], steps=2)


def test_a_mixer_with_a_mix_samples_like_a_backbone(backbone, adapter_dir, blue_adapter):
    """Without per-image classes, each prompt's images draw them from the mix, stratified and always the
    same; every image is the one its class's adapter gives alone."""
    adapters = {"red": adapter_dir, "blue": blue_adapter}
    mixer = ClassAdapterMix(backbone, adapters, mix={"red": 0.5, "blue": 0.5})
    prompts = ["a handwritten digit 1"] * 4 + ["a handwritten digit 7"] * 4
    seeds = list(range(4)) * 2
    kw = dict(seeds=seeds, steps=3, guidance_scale=2.0)
    x = mixer.sample(prompts, **kw)
    from fairtune.models import draw_classes

    drawn = draw_classes(prompts, target=mixer.mix, assignment="stratified", seed=0)
    assert drawn[:4].count("red") == 2 and drawn[4:].count("red") == 2
    assert torch.equal(x, mixer.sample(prompts, **kw, classes=drawn))
    assert torch.equal(x, mixer.sample(prompts, **kw))  # the same draw every call
    for c in ("red", "blue"):
        alone = mixer.backbones[c].sample(prompts, **kw)
        idx = [i for i, k in enumerate(drawn) if k == c]
        assert torch.allclose(x[idx], alone[idx], atol=2e-3)
    with pytest.raises(ValueError, match=r"\['green'\] without an adapter"):
        ClassAdapterMix(backbone, {"red": adapter_dir}, mix={"green": 1.0})
    with pytest.raises(ValueError, match="construct ClassAdapterMix with a mix"):
        ClassAdapterMix(backbone, {"red": adapter_dir}).sample(prompts[:1], seeds=[0], steps=2)


def test_a_scaled_mixer_fuses_every_adapter_at_its_scale(backbone, adapter_dir, blue_adapter, tmp_path):
    """``scale`` is diffusers' ``fuse_lora(lora_scale=...)`` on every adapter: an image of the scaled mix
    is the one that adapter gives fused at that scale alone, and differs from the unscaled one."""
    from fairtune.eval._config import validate_methods
    from fairtune.models import adapter_copy

    adapters = {"red": adapter_dir, "blue": blue_adapter}
    kw = dict(seeds=[0, 1], steps=3, guidance_scale=2.0, classes=["red", "blue"])
    prompts = ["a handwritten digit 1"] * 2
    scaled = ClassAdapterMix(backbone, adapters, scale=1.5).sample(prompts, **kw)
    for i, c in enumerate(("red", "blue")):
        alone = adapter_copy(backbone, adapters[c], fuse=True, scale=1.5).sample(
            prompts[i : i + 1], seeds=[i], steps=3, guidance_scale=2.0
        )
        assert torch.allclose(scaled[i : i + 1], alone, atol=2e-3)
    assert not torch.allclose(scaled, ClassAdapterMix(backbone, adapters).sample(prompts, **kw), atol=1e-3)
    # the comparison's class_adapters method takes the scale; a method without any adapter still refuses one
    validate_methods([MethodConfig("m", kind="class_adapters", class_adapters=adapters, adapter_scale=1.5)])
    with pytest.raises(ValueError, match="no adapter to scale"):
        validate_methods([MethodConfig("b", kind="base", adapter_scale=1.5)])


def test_the_sweep_judge_scores_class_adapters_drawn_in_the_target_mix(adapter_dir, judges_dir, tmp_path):
    """The benchmark judge on a pair: with both classes' adapters the same folder, the pair is that
    adapter, so every figure equals the adapter's own; the target's mix is what the pair is scored on."""
    from fairtune.colored_digits import judge_colored_digits
    from fairtune.models import LORA_WEIGHT_NAME

    config = {
        "model": {"backbone": {"kind": "tiny", "pretrained": "colored-digits-16"}},
        "data": {"concepts": ["digit 0"], "attributes": {"color": ["red", "blue"]},
                 "target": {"proportions": "uniform"}},
    }  # fmt: skip
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / LORA_WEIGHT_NAME).write_bytes((adapter_dir / LORA_WEIGHT_NAME).read_bytes())
    kw = dict(judges=str(judges_dir), n_per_prompt=8, steps=4, digits=[0, 5], batch_size=64)
    alone = judge_colored_digits(run, config, **kw)
    pair = judge_colored_digits(
        tmp_path / "pair", config, **kw, class_adapters={"red": adapter_dir, "blue": adapter_dir}
    )
    for k in ("mean_dev_seen", "red_share_d0", "red_share_d5", "mean_dev_heldout"):
        assert pair[k] == pytest.approx(alone[k], abs=1e-6), k
    joint = {**config, "data": {**config["data"], "target": {"proportions": "uniform", "per_concept": {
        "digit 0": {"red": 1.0, "blue": 0.0}}}}}  # fmt: skip
    with pytest.raises(ValueError, match="one mix for every concept"):
        judge_colored_digits(tmp_path / "pair", joint, **kw, class_adapters={"red": adapter_dir})
    # a scale: the pair at 1.5 is the adapter alone at 1.5 (and a run without adapter has none to scale)
    scaled = judge_colored_digits(
        tmp_path / "pair", config, **kw, class_adapters={"red": adapter_dir, "blue": adapter_dir},
        adapter_scale=1.5,
    )  # fmt: skip
    alone_scaled = judge_colored_digits(run, config, **kw, adapter_scale=1.5)
    for k in ("red_share_d0", "red_share_d5", "mean_dev_seen", "fidelity"):
        assert scaled[k] == pytest.approx(alone_scaled[k], abs=1e-6), k
    with pytest.raises(ValueError, match="no adapter to scale"):
        judge_colored_digits(tmp_path / "empty", config, **kw, adapter_scale=1.5)


def test_dial_with_class_adapters_solves_and_checks_a_request(backbone, adapter_dir, blue_adapter, judges_dir,
                                                              prompts_file, tmp_path, capsys):  # fmt: skip
    out = tmp_path / "mixdial"
    adapters = {"red": str(adapter_dir), "blue": str(blue_adapter)}
    common = ["dial", "--model", "colored-digits-16", "--prompts", str(prompts_file), "--out", str(out),
              "--class_adapters", json.dumps(adapters), *judges_args(judges_dir),
              "--generation.n_per_prompt", "8", "--generation.steps", "4",
              "--generation.batch_size", "64"]  # fmt: skip
    main(common)
    ends = json.loads((out / "mix.json").read_text())
    assert ends["classes"] == ["red", "blue"] and list(ends["adapters"]) == ["red", "blue"]
    a = {c: ends["concepts"]["digit 9"]["share"][c]["red"] for c in ("red", "blue")}
    assert None not in a.values(), "no image of digit 9 was placed"
    want = (a["red"] + a["blue"]) / 2  # between the two adapters: always reachable
    main([*common, "--request", json.dumps({"digit 9": {"red": want}})])
    printed = capsys.readouterr().out
    result = json.loads((out / "request.json").read_text())
    (row,) = result["rows"]
    assert row["concept"] == "digit 9" and row["class"] == "red" and row["reachable"]
    assert row["expected"] == pytest.approx(want, abs=1e-3)
    assert (
        "digit 9: red adapter" in printed
        and "## Requested mixes (class adapters)" in (out / "report.md").read_text()
        and "![requested mixes](request.png)" in (out / "report.md").read_text()
    )
    assert (out / "request.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["generation"]["seed"] == GEN.seed + GEN.n_per_prompt  # fresh seeds
    assert row["low"] <= row["landed"] <= row["high"] and row["abs_error"] == pytest.approx(
        abs(row["landed"] - want)
    )
    assert result["metrics"]["explicit_kept"] is not None
    # --adapter_scale fuses every class adapter at that scale, measured and drawn alike
    scaled = tmp_path / "mixdial_scaled"
    args = [*common[: common.index("--out") + 1], str(scaled), *common[common.index("--out") + 2 :]]
    main([*args, "--adapter_scale", "1.5"])
    ends = json.loads((scaled / "mix.json").read_text())
    assert ends["adapter_scale"] == 1.5
    # a concept both scaled adapters place images of (a few images at a few steps, scaled up, may leave
    # one adapter's digit undetermined, which no mix can be solved for)
    placed = [c for c, r in ends["concepts"].items() if None not in (r["share"][k]["red"] for k in adapters)]
    assert placed
    both = ends["concepts"][placed[0]]["share"]
    request = {placed[0]: {"red": (both["red"]["red"] + both["blue"]["red"]) / 2}}
    main([*args, "--adapter_scale", "1.5", "--request", json.dumps(request)])
    assert json.loads((scaled / "metrics.json").read_text())["methods"]["class_red"]["adapter_scale"] == 1.5
    assert (
        json.loads((scaled / "request" / "metrics.json").read_text())["methods"]["request"]["adapter_scale"]
        == 1.5
    )
    with pytest.raises(ValueError, match="scales --class_adapters"):
        main(
            [
                *common[: common.index("--class_adapters")],
                "--adapter",
                str(adapter_dir),
                "--adapter_scale",
                "2",
            ]
        )


def test_a_prompt_that_names_a_class_is_routed_to_that_classs_adapter_whatever_the_mix(adapter_dir):
    from fairtune.data import AttributeSpec, Target, TargetConfig
    from fairtune.eval import PromptEntry
    from fairtune.eval._config import validate_methods
    from fairtune.eval._generation import mix_classes, named_class

    classes = ["red", "blue"]
    assert named_class("a red handwritten digit 9", classes) == "red"
    assert named_class("A Blue digit", classes) == "blue"
    assert named_class("a handwritten digit 9", classes) is None
    assert named_class("a reddish digit, red-brown", classes) is None  # not the word itself
    assert named_class("red and blue digits", classes) is None  # two classes: the mix decides
    entries = [
        PromptEntry("n/9", "n", "seen", "digit 9", "a handwritten digit 9"),
        PromptEntry("e/9", "e", "explicit", "digit 9", "a red handwritten digit 9", names="red"),
    ]
    target = Target(TargetConfig(), AttributeSpec({"color": classes}))
    all_blue = {"*": {"red": 0.0, "blue": 1.0}}
    adapters = {"red": str(adapter_dir), "blue": str(adapter_dir)}
    routed = MethodConfig("m", kind="class_adapters", class_adapters=adapters, mix=all_blue, route_named=True)
    assert mix_classes(routed, entries, target, 4) == ["blue"] * 4 + ["red"] * 4
    # an explicit group's named class first (whatever words its prompt uses), else a class word
    worded = [PromptEntry("e/9", "e", "explicit", "digit 9", "a crimson digit 9", names="red"), entries[0]]
    assert mix_classes(routed, worded, target, 2) == ["red", "red", "blue", "blue"]
    plain = MethodConfig("m", kind="class_adapters", class_adapters=adapters, mix=all_blue)
    assert mix_classes(plain, entries, target, 4) == ["blue"] * 8  # the explicit prompt follows the mix
    with pytest.raises(ValueError, match="class_adapters"):
        validate_methods([MethodConfig("b", kind="base", route_named=True)])
