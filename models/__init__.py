"""Backbones (tiny text-to-image, Stable Diffusion, SDXL), LoRA attach / export, the adversary head,
attribute classifiers, and the inference-time baselines (Fair Diffusion, prompt augmentation).

``fairtune.models`` imports only ``fairtune.data``.

Names load on first use (PEP 562), so a light command (``fairtune flag``, ``--help``) does not
import torch, Lightning or diffusers it never touches.
"""

from __future__ import annotations

import importlib

from . import _quiet as _quiet

# name -> (submodule, attribute): the public facade
_EXPORTS = {
    "AdversaryConfig": ("._adversary", "AdversaryConfig"),
    "AttributeHead": ("._adversary", "AttributeHead"),
    "MidBlockFeatures": ("._adversary", "MidBlockFeatures"),
    "adversary_losses": ("._adversary", "adversary_losses"),
    "grad_reverse": ("._adversary", "grad_reverse"),
    "BACKBONE_FILE": ("._backbones", "BACKBONE_FILE"),
    "Backbone": ("._backbones", "Backbone"),
    "BackboneConfig": ("._backbones", "BackboneConfig"),
    "TinyTextToImagePipeline": ("._backbones", "TinyTextToImagePipeline"),
    "TinyUNetConfig": ("._backbones", "TinyUNetConfig"),
    "default_text_encoder": ("._backbones", "default_text_encoder"),
    "resolve_shipped": ("._shipped", "resolve_shipped"),
    "FairDiffusionConfig": ("._baselines", "FairDiffusionConfig"),
    "FairDiffusionPipeline": ("._baselines", "FairDiffusionPipeline"),
    "SemanticGuidance": ("._baselines", "SemanticGuidance"),
    "fair_diffusion_sample": ("._baselines", "fair_diffusion_sample"),
    "ClassifierConfig": ("._classifiers", "ClassifierConfig"),
    "CNNTrainConfig": ("._classifiers", "CNNTrainConfig"),
    "SmallCNN": ("._classifiers", "SmallCNN"),
    "features_batched": ("._classifiers", "features_batched"),
    "import_module_class": ("._classifiers", "import_module_class"),
    "load_classifier": ("._classifiers", "load_classifier"),
    "predict_batched": ("._classifiers", "predict_batched"),
    "save_safetensors_atomic": ("._classifiers", "save_safetensors_atomic"),
    "train_attribute_classifier": ("._classifiers", "train_attribute_classifier"),
    "train_cnn": ("._classifiers", "train_cnn"),
    "ATTENTION": ("._lora", "ATTENTION"),
    "ATTENTION_AND_CONVS": ("._lora", "ATTENTION_AND_CONVS"),
    "LORA_WEIGHT_NAME": ("._lora", "LORA_WEIGHT_NAME"),
    "LoraConfig": ("._lora", "LoraConfig"),
    "attach_lora": ("._lora", "attach_lora"),
    "export_is_complete": ("._lora", "export_is_complete"),
    "load_adapter": ("._lora", "load_adapter"),
    "load_lora_into": ("._lora", "load_lora_into"),
    "lora_state_dict": ("._lora", "lora_state_dict"),
    "remove_stale_temporaries": ("._lora", "remove_stale_temporaries"),
    "save_lora": ("._lora", "save_lora"),
    "PromptAugmentationConfig": ("._prompt_augmentation", "PromptAugmentationConfig"),
    "augment_prompts": ("._prompt_augmentation", "augment_prompts"),
    "draw_classes": ("._prompt_augmentation", "draw_classes"),
    "unet_evals_per_image": ("._prompt_augmentation", "unet_evals_per_image"),
    "make_tiny_sdxl": ("._sdxl", "make_tiny_sdxl"),
    "make_tiny_stable_diffusion": ("._tiny_sd", "make_tiny_stable_diffusion"),
    "CLIPImageFeatures": ("._clip", "CLIPImageFeatures"),
    "CLIPLinearProbe": ("._clip", "CLIPLinearProbe"),
    "ClipPreprocess": ("._clip", "ClipPreprocess"),
    "CLIPZeroShotClassifier": ("._clip", "CLIPZeroShotClassifier"),
    "make_tiny_clip": ("._clip", "make_tiny_clip"),
    "train_clip_probe": ("._clip", "train_clip_probe"),
    "add_audit_to_model_card": ("._model_card", "add_audit_to_model_card"),
    "audit_section": ("._model_card", "audit_section"),
    "write_model_card": ("._model_card", "write_model_card"),
}

__all__ = [
    "adversary_losses",
    "AdversaryConfig",
    "attach_lora",
    "ATTENTION",
    "ATTENTION_AND_CONVS",
    "AttributeHead",
    "augment_prompts",
    "Backbone",
    "BACKBONE_FILE",
    "BackboneConfig",
    "ClassifierConfig",
    "CNNTrainConfig",
    "default_text_encoder",
    "draw_classes",
    "export_is_complete",
    "fair_diffusion_sample",
    "FairDiffusionConfig",
    "FairDiffusionPipeline",
    "features_batched",
    "grad_reverse",
    "import_module_class",
    "load_adapter",
    "load_classifier",
    "load_lora_into",
    "lora_state_dict",
    "LORA_WEIGHT_NAME",
    "LoraConfig",
    "make_tiny_sdxl",
    "make_tiny_stable_diffusion",
    "MidBlockFeatures",
    "predict_batched",
    "PromptAugmentationConfig",
    "remove_stale_temporaries",
    "resolve_shipped",
    "save_lora",
    "save_safetensors_atomic",
    "SemanticGuidance",
    "SmallCNN",
    "TinyTextToImagePipeline",
    "TinyUNetConfig",
    "train_attribute_classifier",
    "train_cnn",
    "unet_evals_per_image",
    "CLIPImageFeatures",
    "CLIPLinearProbe",
    "CLIPZeroShotClassifier",
    "ClipPreprocess",
    "make_tiny_clip",
    "train_clip_probe",
    "add_audit_to_model_card",
    "audit_section",
    "write_model_card",
]


def __getattr__(name: str):
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
