"""CLIP attribute classifiers and image features, from a CLIP folder in the standard layout.

A CLIP folder is what ``transformers`` writes with ``save_pretrained``: ``config.json`` (a
``CLIPModel``, or a vision-only ``CLIPVisionModelWithProjection``), ``model.safetensors``, the
tokenizer files and ``preprocessor_config.json``. It is read from a local path or a hub id (through
the hub cache; never ``trust_remote_code``).

Every module here takes images as float tensors ``(B, 3, H, W)`` in **[0, 1]** (what
``Backbone.to_pixels`` gives lever 3's classifier) and resizes, crops and normalises them in torch
with the folder's preprocessor settings, so gradients reach the image:

- :class:`CLIPZeroShotClassifier`: one or more text prompts per class; logits over the classes.
- :class:`CLIPLinearProbe`: a linear layer on CLIP image embeddings, trained by
  :func:`train_clip_probe` on a labelled image folder or ``datasets`` table.
- :class:`CLIPImageFeatures`: image embeddings (lever 3's preservation term, the same-seed change
  score, a Fréchet distance).

:func:`make_tiny_clip` assembles a tiny random CLIP from config and saves it in that layout, so the
code paths real CLIP folders take are tested where nothing can be downloaded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fairtune.data import atomic_path, atomic_write_json

from ._classifiers import judged_labels
from ._shipped import resolve_shipped

PROBE_WEIGHTS = "probe.safetensors"
PROBE_CONFIG = "probe.json"
LABEL = "{label}"


def make_tiny_clip(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    projection_dim: int = 16,
    vision_only: bool = False,
) -> Path:
    """Assemble a tiny random CLIP (``CLIPModel``, byte-level ``CLIPTokenizer``, ``CLIPImageProcessor``)
    and save it to ``path`` in the layout of a real CLIP folder; returns the folder.

    Args:
        path: Folder to write.
        seed: Seed of the random initialisation.
        image_size: Side the vision tower reads (the processor's resize and crop size).
        patch_size: ViT patch side.
        hidden_size: Width of both towers.
        projection_dim: Width of the joint embedding.
        vision_only: Save only the image tower and projection (``CLIPVisionModelWithProjection``, as
            image-embedding folders ship); same weights as the full model of this seed.
    """
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from ._tiny_sd import byte_level_vocab

    torch.manual_seed(seed)
    vocab = byte_level_vocab()
    tower = dict(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **tower,
        ),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **tower),
        projection_dim=projection_dim,
    )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model = CLIPModel(config)
    if vision_only:
        vcfg = CLIPVisionConfig(
            image_size=image_size, patch_size=patch_size, projection_dim=projection_dim, **tower
        )
        vis = CLIPVisionModelWithProjection(vcfg)
        vis.vision_model.load_state_dict(model.vision_model.state_dict())
        vis.visual_projection.load_state_dict(model.visual_projection.state_dict())
        vis.save_pretrained(out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True)
        CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(out)
    return out


def _read_json(clip: str, name: str) -> dict:
    """A JSON file of a CLIP folder (local path or hub id)."""
    p = Path(clip)
    if p.is_dir():
        f = p / name
        if not f.is_file():
            raise FileNotFoundError(f"CLIP folder {clip!r} has no {name}")
        return json.loads(f.read_text())
    if p.exists() or clip.startswith((".", "/")):
        raise FileNotFoundError(f"CLIP folder {clip!r} is not a folder")
    from transformers.utils import cached_file

    return json.loads(Path(cached_file(clip, name)).read_text())


class ClipPreprocess(nn.Module):
    """The folder's ``CLIPImageProcessor`` steps in torch (differentiable): images in [0, 1] are
    resized (shortest edge, bicubic), centre-cropped and normalised with its mean and std.

    Args:
        clip: The CLIP folder (local path or hub id).
    """

    def __init__(self, clip: str) -> None:
        super().__init__()
        cfg = _read_json(str(clip), "preprocessor_config.json")
        size = cfg.get("size", 224)
        crop = cfg.get("crop_size", size)
        self.do_resize = bool(cfg.get("do_resize", True))
        self.do_crop = bool(cfg.get("do_center_crop", True))
        self.shortest = size.get("shortest_edge") if isinstance(size, dict) else int(size)
        self.resize_hw = (
            (size["height"], size["width"]) if isinstance(size, dict) and "height" in size else None
        )
        self.crop_hw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
        mean = cfg.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
        std = cfg.get("image_std", [0.26862954, 0.26130258, 0.27577711])
        if not cfg.get("do_normalize", True):
            mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = images.float()
        h, w = x.shape[-2:]
        if self.do_resize:
            if self.resize_hw is not None:
                hw = self.resize_hw
            else:
                s = self.shortest / min(h, w)
                hw = (max(self.shortest, round(h * s)), max(self.shortest, round(w * s)))
            if hw != (h, w):
                down = hw[0] < h or hw[1] < w
                x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=down)
        if self.do_crop:
            ch, cw = self.crop_hw
            h, w = x.shape[-2:]
            if h < ch or w < cw:
                x = F.pad(x, (0, max(0, cw - w), 0, max(0, ch - h)))
                h, w = x.shape[-2:]
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        return (x - self.mean) / self.std


def _load_vision(clip: str, dtype: torch.dtype):
    """(vision tower, visual projection, full model or None) from a CLIP folder."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    kind = _read_json(str(clip), "config.json").get("model_type")
    if kind == "clip":
        model = CLIPModel.from_pretrained(str(clip)).to(dtype)
        return model.vision_model, model.visual_projection, model
    if kind == "clip_vision_model":
        model = CLIPVisionModelWithProjection.from_pretrained(str(clip)).to(dtype)
        return model.vision_model, model.visual_projection, None
    raise ValueError(
        f"CLIP folder {clip!r}: config.json model_type is {kind!r}, expected 'clip' or 'clip_vision_model'"
    )


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {name!r}") from None


class CLIPImageFeatures(nn.Module):
    """CLIP image embeddings of images in [0, 1], differentiable in the image; frozen.

    Args:
        clip: CLIP folder (``CLIPModel`` or ``CLIPVisionModelWithProjection``; local path or hub id).
        normalize: L2-normalise the embeddings (CLIP's joint space compares directions).
        projection: The projected embedding (``image_embeds``); ``False``: the vision tower's pooled
            output before the projection.
        dtype: Weights' dtype (``float32``, ``float16``, ``bfloat16``); outputs are float32.
    """

    loads_own_weights = True  # from the CLIP folder: a classifier config needs no weights file

    def __init__(
        self, clip: str, *, normalize: bool = True, projection: bool = True, dtype: str = "float32"
    ) -> None:
        super().__init__()
        self.clip = str(resolve_shipped(str(clip)))  # a folder, a registered name, else a hub id
        self.preprocess = ClipPreprocess(self.clip)
        self.vision, proj, full = _load_vision(self.clip, _dtype(dtype))
        self.projection = proj if projection else None
        self.normalize = normalize
        self.dim = proj.out_features if projection else self.vision.config.hidden_size
        # not a submodule: subclasses read the text tower from it once, then it is released
        self.__dict__["_text_source"] = full
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        # frozen: dropout and the like stay off even inside a training LightningModule
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(B, D)`` of images in [0, 1] (also for a classifier subclass, whose
        ``forward`` gives logits: the Fréchet distance and the change score read these)."""
        x = self.preprocess(images).to(next(self.vision.parameters()).dtype)
        feats = self.vision(pixel_values=x).pooler_output
        if self.projection is not None:
            feats = self.projection(feats)
        feats = feats.float()
        return F.normalize(feats, dim=-1) if self.normalize else feats


def _class_prompts(classes: list[str], prompts) -> list[list[str]]:
    """Prompts per class from ``None`` (``a photo of a {label}``), a list of templates with
    ``{label}``, or a dict class -> prompts."""
    if not classes:
        raise ValueError("classes must name at least one class")
    if prompts is None:
        prompts = ["a photo of a {label}"]
    if isinstance(prompts, dict):
        missing = [c for c in classes if not prompts.get(c)]
        if missing:
            raise ValueError(f"prompts has no prompt for class(es) {missing}; it has {list(prompts)}")
        extra = [c for c in prompts if c not in classes]
        if extra:
            raise ValueError(f"prompts names class(es) {extra} not in classes {classes}")
        return [[prompts[c]] if isinstance(prompts[c], str) else list(prompts[c]) for c in classes]
    templates = [prompts] if isinstance(prompts, str) else list(prompts)
    bad = [t for t in templates if LABEL not in t]
    if bad:
        raise ValueError(f"prompt template(s) {bad} lack the {LABEL} placeholder")
    return [[t.replace(LABEL, c) for t in templates] for c in classes]


@torch.no_grad()
def _text_embeddings(model, clip: str, groups: list[list[str]]) -> torch.Tensor:
    """Per group, the normalised mean of its prompts' normalised text embeddings (prompt ensembling)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(clip)
    flat = [p for g in groups for p in g]
    enc = tok(flat, padding=True, truncation=True, return_tensors="pt")
    pooled = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
    emb = F.normalize(model.text_projection(pooled).float(), dim=-1)
    out, i = [], 0
    for g in groups:
        out.append(F.normalize(emb[i : i + len(g)].mean(0), dim=-1))
        i += len(g)
    return torch.stack(out)


class _Predicts:
    """``predict``: class index per image, ``-1`` (undetermined) below a confidence."""

    min_confidence: float = 0.0

    @torch.no_grad()
    def predict(self, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            logits = self.judge_logits(images[i : i + batch_size])
            label = judged_labels(logits, min_confidence=self.min_confidence)
            # columns past the named classes (a probe's "none of them") place no image either
            out.append(torch.where(label < len(self.classes), label, torch.full_like(label, -1)).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def judge_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)


class CLIPZeroShotClassifier(_Predicts, CLIPImageFeatures):
    """Zero-shot attribute classifier: cosine similarity of the image embedding to each class's text
    embedding (its prompts' mean), times CLIP's logit scale. Frozen; differentiable in the image.

    Args:
        clip: A full CLIP folder (``CLIPModel``: both towers).
        classes: Class names, in the attribute's declared order.
        prompts: ``None`` (``"a photo of a {label}"``), template(s) with ``{label}``, or a dict from
            each class to its prompts (e.g. ``{"male": ["a photo of a man"], ...}``).
        undetermined_prompts: Prompts for "none of the classes" (e.g. ``"a photo with no person"``):
            :meth:`predict` returns ``-1`` where they win; ``forward`` ignores them.
        logit_scale: Multiplier of the cosine similarities; ``None``: the model's learned scale.
        min_confidence: :meth:`predict` returns ``-1`` below this top-class probability.
        dtype: Weights' dtype.
    """

    def __init__(
        self,
        clip: str,
        classes: list[str],
        prompts: dict[str, list[str] | str] | list[str] | str | None = None,
        *,
        undetermined_prompts: list[str] | None = None,
        logit_scale: float | None = None,
        min_confidence: float = 0.0,
        dtype: str = "float32",
    ) -> None:
        super().__init__(clip, normalize=True, projection=True, dtype=dtype)
        full = self._text_source
        if full is None:
            raise ValueError(f"CLIP folder {clip!r} holds only the vision tower; zero-shot needs a CLIPModel")
        self.classes = list(classes)
        groups = _class_prompts(self.classes, prompts)
        self.prompts = {c: g for c, g in zip(self.classes, groups)}
        if undetermined_prompts:
            groups = groups + [list(undetermined_prompts)]
        self.register_buffer("text", _text_embeddings(full, self.clip, groups))
        self.scale = float(full.logit_scale.detach().exp()) if logit_scale is None else float(logit_scale)
        self.min_confidence = min_confidence
        self.__dict__["_text_source"] = None  # the text tower is no longer needed

    def judge_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.scale * self.features(images) @ self.text.T

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` over ``classes`` for images in [0, 1]."""
        return self.judge_logits(images)[:, : len(self.classes)]


class CLIPLinearProbe(_Predicts, CLIPImageFeatures):
    """A linear classifier on (normalised) CLIP image embeddings; the CLIP tower stays frozen.

    Args:
        clip: CLIP folder; with ``probe``, overrides the folder recorded in the probe's config.
        classes: Class names (a new, untrained probe).
        probe: A folder written by :func:`train_clip_probe` (``probe.json`` + ``probe.safetensors``).
        min_confidence: :meth:`predict` returns ``-1`` below this top-class probability.
        dtype: CLIP weights' dtype.
    """

    def __init__(
        self,
        clip: str | None = None,
        classes: list[str] | None = None,
        *,
        probe: str | None = None,
        min_confidence: float = 0.0,
        dtype: str = "float32",
    ) -> None:
        meta: dict = {}
        if probe is not None:
            cfg_file = Path(probe) / PROBE_CONFIG
            if not cfg_file.is_file():
                raise FileNotFoundError(
                    f"probe folder {probe!r} has no {PROBE_CONFIG} (see train_clip_probe)"
                )
            meta = json.loads(cfg_file.read_text())
            for key in ("clip", "classes"):
                if key not in meta:
                    raise ValueError(f"{cfg_file}: missing key {key!r}")
            clip = clip or meta["clip"]
            if classes is not None and list(classes) != meta["classes"]:
                raise ValueError(f"classes {classes} differ from the probe's {meta['classes']} ({cfg_file})")
            classes = meta["classes"]
        if clip is None or not classes:
            raise ValueError("CLIPLinearProbe needs clip and classes, or a trained probe folder")
        super().__init__(clip, normalize=True, projection=True, dtype=dtype)
        self.__dict__["_text_source"] = None
        self.classes = list(classes)
        self.meta = meta
        self.min_confidence = min_confidence
        self.head = nn.Linear(self.dim, len(self.classes))
        if probe is not None:
            from safetensors.torch import load_file

            self.head.load_state_dict(load_file(str(Path(probe) / PROBE_WEIGHTS)))
        self.head.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` over ``classes`` for images in [0, 1]."""
        return self.head(self.features(images))


def _image_tensor(img, side: int) -> torch.Tensor:
    """PIL image -> ``(3, side, side)`` in [0, 1] (bicubic; CLIP's preprocess takes it from there)."""
    import numpy as np
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (side, side):
        img = img.resize((side, side), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def train_clip_probe(
    data,
    out: str | Path,
    *,
    clip: str,
    attribute: str,
    classes: list[str] | None = None,
    image_column: str = "image",
    label_column: str | None = None,
    format: str = "auto",
    split: str = "train",
    val_fraction: float = 0.2,
    C: float = 10.0,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """Fit a linear probe on CLIP image embeddings of labelled images; write ``probe.safetensors`` and
    ``probe.json`` to ``out``.

    Args:
        data: A ``datasets`` table, or a path :func:`fairtune.data.load_table` reads (imagefolder with
            ``metadata.jsonl``, ``save_to_disk`` folder, parquet).
        out: Output folder.
        clip: The CLIP folder whose image embeddings the probe reads.
        attribute: The attribute's name (recorded; also the default label column).
        classes: Class names in order; default: the sorted distinct labels.
        image_column: Column of the images.
        label_column: Column of the labels (default ``attribute``); empty/None labels are skipped.
        format: How to read a path (see ``load_table``).
        split: Split to read from a path.
        val_fraction: Share of each class held out to measure accuracy and the confusion matrix.
        C: Inverse L2 strength of the logistic regression (scikit-learn's, on unit-norm features).
        batch_size: Images per CLIP forward pass.
        seed: Seed of the split.

    Returns:
        The report written into ``probe.json`` (classes, counts, train/val accuracy, val confusion).
    """
    import numpy as np
    from safetensors.torch import save_file
    from sklearn.linear_model import LogisticRegression

    from fairtune.data import decode_image, load_table

    table = (
        load_table(str(data), format=format, split=split) if isinstance(data, (str, os.PathLike)) else data
    )
    col = label_column or attribute
    for c in (image_column, col):
        if c not in table.column_names:
            raise ValueError(f"probe data has no column {c!r}; columns: {table.column_names}")
    raw = table[col]
    keep = [i for i, v in enumerate(raw) if v is not None and str(v) != ""]
    labels_str = [str(raw[i]) for i in keep]
    classes = list(classes) if classes else sorted(set(labels_str))
    index = {c: k for k, c in enumerate(classes)}
    for i, v in zip(keep, labels_str):
        if v not in index:
            raise ValueError(f"record {i}: {col}={v!r} is not one of the classes {classes}")
    y = np.array([index[v] for v in labels_str])
    counts = np.bincount(y, minlength=len(classes))
    if (counts < 2).any():
        raise ValueError(
            f"each class needs at least 2 labelled images; counts {dict(zip(classes, counts.tolist()))}"
        )

    feats_mod = CLIPImageFeatures(clip)
    side = max(feats_mod.preprocess.crop_hw)
    import datasets

    if isinstance(table.features.get(image_column), datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))
    feats = []
    with torch.no_grad():
        for s in range(0, len(keep), batch_size):
            ids = keep[s : s + batch_size]
            imgs = []
            for i in ids:
                try:
                    imgs.append(_image_tensor(decode_image(table[i][image_column]), side))
                except Exception as exc:  # noqa: BLE001 - name the record
                    raise ValueError(f"record {i}: cannot read image ({exc})") from exc
            feats.append(feats_mod(torch.stack(imgs)))
    x = torch.cat(feats).numpy().astype(np.float64)

    rng = np.random.default_rng(seed)
    val = np.zeros(len(y), dtype=bool)
    for k in range(len(classes)):
        ids = rng.permutation(np.flatnonzero(y == k))
        val[ids[: int(math.floor(val_fraction * len(ids)))]] = True
    reg = LogisticRegression(C=C, max_iter=2000)
    reg.fit(x[~val], y[~val])
    coef, bias = reg.coef_, reg.intercept_
    if len(classes) == 2:  # scikit-learn's binary form: one logit for class 1
        coef = np.vstack([-coef / 2, coef / 2])
        bias = np.array([-bias[0] / 2, bias[0] / 2])
    weights = {
        "weight": torch.tensor(coef, dtype=torch.float32).contiguous(),
        "bias": torch.tensor(bias, dtype=torch.float32).contiguous(),
    }

    def pred(xs):
        return (xs @ coef.T + bias).argmax(1)

    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    if val.any():
        np.add.at(confusion, (y[val], pred(x[val])), 1)
    clip_ref = str(Path(clip).resolve()) if Path(clip).exists() else str(clip)
    report = {
        "clip": clip_ref,
        "attribute": attribute,
        "classes": classes,
        "counts": dict(zip(classes, counts.tolist())),
        "n_train": int((~val).sum()),
        "n_val": int(val.sum()),
        "train_accuracy": float((pred(x[~val]) == y[~val]).mean()),
        "val_accuracy": float((pred(x[val]) == y[val]).mean()) if val.any() else None,
        "majority_rate": float(counts.max() / counts.sum()),
        "val_confusion": confusion.tolist(),
        "C": C,
        "seed": seed,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / PROBE_WEIGHTS) as tmp:
        save_file(weights, str(tmp))
    atomic_write_json(out / PROBE_CONFIG, report, indent=2)
    return report
