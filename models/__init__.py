"""Backbones (tiny text-to-image, Stable Diffusion, SDXL), LoRA attach / export, the adversary head,
attribute classifiers, and the inference-time baselines (Fair Diffusion, prompt augmentation).

``fairtune.models`` imports only ``fairtune.data``.
"""

from . import _quiet as _quiet  # first: silences an import-time notice of transformers
from ._adversary import (
    AdversaryConfig,
    AttributeHead,
    MidBlockFeatures,
    adversary_losses,
    grad_reverse,
)
from ._backbones import (
    BACKBONE_FILE,
    Backbone,
    BackboneConfig,
    TinyTextToImagePipeline,
    TinyUNetConfig,
    default_text_encoder,
    resolve_shipped,
)
from ._baselines import (
    FairDiffusionConfig,
    FairDiffusionPipeline,
    SemanticGuidance,
    fair_diffusion_sample,
)
from ._classifiers import (
    ClassifierConfig,
    CNNTrainConfig,
    SmallCNN,
    features_batched,
    import_module_class,
    load_classifier,
    predict_batched,
    save_safetensors_atomic,
    train_attribute_classifier,
    train_cnn,
)
from ._lora import (
    ATTENTION,
    ATTENTION_AND_CONVS,
    LORA_WEIGHT_NAME,
    LoraConfig,
    attach_lora,
    export_is_complete,
    load_adapter,
    load_lora_into,
    lora_state_dict,
    remove_stale_temporaries,
    save_lora,
)
from ._prompt_augmentation import (
    PromptAugmentationConfig,
    augment_prompts,
    draw_classes,
    unet_evals_per_image,
)
from ._sdxl import make_tiny_sdxl
from ._tiny_sd import make_tiny_stable_diffusion

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
]

from ._clip import (  # noqa: E402
    CLIPImageFeatures,
    CLIPLinearProbe,
    ClipPreprocess,
    CLIPZeroShotClassifier,
    make_tiny_clip,
    train_clip_probe,
)
from ._model_card import add_audit_to_model_card, audit_section, write_model_card  # noqa: E402

__all__ += [
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
