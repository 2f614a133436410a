import json

import numpy as np
import pytest
import torch
from PIL import Image

from fairtune.models import (
    CLIPImageFeatures,
    CLIPLinearProbe,
    CLIPZeroShotClassifier,
    make_tiny_clip,
    train_clip_probe,
)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def test_tiny_clip_folder_has_the_real_layout_and_reloads(tiny_clip):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    for f in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"):
        assert (tiny_clip / f).is_file(), f
    model = CLIPModel.from_pretrained(str(tiny_clip))
    tok = CLIPTokenizer.from_pretrained(str(tiny_clip))
    proc = CLIPImageProcessor.from_pretrained(str(tiny_clip))
    assert proc.crop_size["height"] == model.config.vision_config.image_size == 32
    ids = tok(["a photo of a doctor"], return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id


def test_zero_shot_logits_match_transformers_clip(tiny_clip):
    """Our torch preprocessing + prompt embedding reproduce CLIPModel's own logits_per_image."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    prompts = {"doctor": "a photo of a doctor", "nurse": "a photo of a nurse"}
    clf = CLIPZeroShotClassifier(str(tiny_clip), ["doctor", "nurse"], prompts)
    ours = clf(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0)

    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    tok = CLIPTokenizer.from_pretrained(str(tiny_clip))
    proc = CLIPImageProcessor.from_pretrained(str(tiny_clip))
    enc = tok(list(prompts.values()), padding=True, return_tensors="pt")
    pix = proc(images=[Image.fromarray(a) for a in arr], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pix)
    torch.testing.assert_close(ours, ref.logits_per_image, atol=1e-4, rtol=1e-4)


def test_zero_shot_is_differentiable_in_the_image(tiny_clip):
    clf = CLIPZeroShotClassifier(
        str(tiny_clip), ["male", "female"], ["a photo of a {label} person", "a {label}"]
    )
    assert not any(p.requires_grad for p in clf.parameters())
    x = torch.rand(4, 3, 16, 16)  # smaller than CLIP's input: upsampled in torch
    p0 = clf(x).softmax(-1)[:, 0].mean()
    x = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        (-clf(x.clamp(0, 1)).log_softmax(-1)[:, 0].mean()).backward()
        opt.step()
    with torch.no_grad():
        p1 = clf(x.clamp(0, 1)).softmax(-1)[:, 0].mean()
    assert p1 > p0 + 0.05  # the gradient through CLIP moved the images toward class 0


def test_zero_shot_prompts_errors_and_undetermined(tiny_clip, tmp_path):
    with pytest.raises(ValueError, match="placeholder"):
        CLIPZeroShotClassifier(str(tiny_clip), ["a", "b"], ["a photo"])
    with pytest.raises(ValueError, match=r"no prompt for class\(es\) \['b'\]"):
        CLIPZeroShotClassifier(str(tiny_clip), ["a", "b"], {"a": ["x"]})
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        CLIPZeroShotClassifier(str(tmp_path), ["a"])  # a folder, but no CLIP in it
    x = torch.rand(8, 3, 32, 32)
    sure = CLIPZeroShotClassifier(str(tiny_clip), ["a", "b"])
    assert set(sure.predict(x).tolist()) <= {0, 1}
    # an impossible confidence bar leaves every image undetermined
    unsure = CLIPZeroShotClassifier(str(tiny_clip), ["a", "b"], min_confidence=1.01)
    assert (unsure.predict(x) == -1).all()
    # "none of these" prompts that always win: all undetermined, while forward keeps K logits
    none = CLIPZeroShotClassifier(
        str(tiny_clip),
        ["a", "b"],
        undetermined_prompts=["a photo of a b"],
        logit_scale=100.0,
        prompts={"a": "zzz", "b": "qqq"},
    )
    assert none(x).shape == (8, 2)
    full = none.judge_logits(x)
    assert full.shape == (8, 3)
    assert ((none.predict(x) == -1) == (full.argmax(1) == 2)).all()


def test_vision_only_folder_gives_the_same_features(tiny_clip, tmp_path):
    vis = make_tiny_clip(tmp_path / "vis", vision_only=True)
    assert json.loads((vis / "config.json").read_text())["model_type"] == "clip_vision_model"
    x = torch.rand(3, 3, 40, 24)  # non-square: shortest-edge resize and centre crop
    a, b = CLIPImageFeatures(str(tiny_clip))(x), CLIPImageFeatures(str(vis))(x)
    torch.testing.assert_close(a, b)
    assert a.shape == (3, 16)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="only the vision tower"):
        CLIPZeroShotClassifier(str(vis), ["a", "b"])


def _color_folder(root, n_per_class=24, seed=0, bad_label=False):
    """An imagefolder with metadata.jsonl: noisy reddish vs bluish 24x24 images."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = []
    for color, base in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        for i in range(n_per_class):
            arr = np.clip(np.array(base) + rng.normal(0, 40, size=(24, 24, 3)), 0, 255).astype(np.uint8)
            name = f"{color}_{i}.png"
            Image.fromarray(arr).save(root / name)
            rows.append({"file_name": name, "color": color, "prompt": "x", "concept": "c"})
    if bad_label:
        rows[0]["color"] = "green"
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_probe_trains_on_an_imagefolder_beats_chance_and_reloads(tiny_clip, tmp_path):
    data = _color_folder(tmp_path / "data")
    report = train_clip_probe(
        data, tmp_path / "probe", clip=str(tiny_clip), attribute="color", classes=["red", "blue"]
    )
    assert report["n_val"] == 8 and report["n_train"] == 40
    assert report["val_accuracy"] >= 0.875 > report["majority_rate"]
    probe = CLIPLinearProbe(probe=str(tmp_path / "probe"))
    assert probe.classes == ["red", "blue"]
    # the reloaded probe classifies fresh images of the toy attribute
    fresh = _color_folder(tmp_path / "fresh", n_per_class=16, seed=1)
    imgs = [np.asarray(Image.open(fresh / f"{c}_{i}.png")) for c in ("red", "blue") for i in range(16)]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    y = torch.tensor([0] * 16 + [1] * 16)
    assert (probe.predict(x) == y).float().mean() >= 0.85
    x.requires_grad_(True)
    probe(x)[:, 0].sum().backward()
    assert x.grad.abs().sum() > 0


def test_probe_data_errors_name_the_record(tiny_clip, tmp_path):
    data = _color_folder(tmp_path / "data", n_per_class=4, bad_label=True)
    with pytest.raises(ValueError, match=r"record \d+: color='green' is not one of the classes"):
        train_clip_probe(
            data, tmp_path / "p", clip=str(tiny_clip), attribute="color", classes=["red", "blue"]
        )
    with pytest.raises(ValueError, match="no column 'gender'"):
        train_clip_probe(data, tmp_path / "p", clip=str(tiny_clip), attribute="gender")
    with pytest.raises(FileNotFoundError, match="probe.json"):
        CLIPLinearProbe(probe=str(tmp_path))


def test_probe_from_the_cli_serves_as_lever_3_classifier_and_as_judge(tiny_clip, tmp_path, capsys):
    from fairtune.cli import main
    from fairtune.eval import ClipJudgeConfig, build_clip_judge
    from fairtune.models import ClassifierConfig, load_classifier

    data = _color_folder(tmp_path / "data")
    main(["classifier", "clip-probe", "--data", str(data), "--out", str(tmp_path / "probe"),
          "--clip", str(tiny_clip), "--attribute", "color", "--classes", "[red, blue]"])  # fmt: skip
    assert json.loads(capsys.readouterr().out)["val_accuracy"] >= 0.875
    # lever 3's classifier config: no weights file, the probe folder carries them
    probe = {"probe": str(tmp_path / "probe")}
    clf = load_classifier(ClassifierConfig(module="fairtune.models.CLIPLinearProbe", init_args=probe))
    zero_shot = {"clip": str(tiny_clip), "classes": ["red", "blue"]}
    zs = load_classifier(
        ClassifierConfig(module="fairtune.models.CLIPZeroShotClassifier", init_args=zero_shot)
    )
    x = torch.rand(4, 3, 16, 16)
    assert clf(x).shape == zs(x).shape == (4, 2)
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    # a module that does not load its own weights still needs a weights file
    with pytest.raises(ValueError, match="weights is not set"):
        load_classifier(ClassifierConfig(module="fairtune.colored_digits.SmallCNN", weights=None))
    # the same probe as a judge; a probe over other classes is refused
    _, predict, how = build_clip_judge(
        ClipJudgeConfig(probe=str(tmp_path / "probe")), classes=["red", "blue"]
    )
    assert "linear probe" in how and set(predict(x).tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="has classes"):
        build_clip_judge(ClipJudgeConfig(probe=str(tmp_path / "probe")), classes=["blue", "red"])
    with pytest.raises(ValueError, match="needs clip"):
        build_clip_judge(ClipJudgeConfig(), classes=["red", "blue"])
