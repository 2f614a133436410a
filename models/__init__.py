"""Backbones (tiny text-to-image, Stable Diffusion), LoRA attach/export."""

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
    load_adapter,
    lora_state_dict,
    save_lora,
)

__all__ = [
    "ClassifierConfig",
    "CNNTrainConfig",
    "SmallCNN",
    "features_batched",
    "import_module_class",
    "load_classifier",
    "predict_batched",
    "save_safetensors_atomic",
    "train_attribute_classifier",
    "train_cnn",
    "AdversaryConfig",
    "AttributeHead",
    "MidBlockFeatures",
    "adversary_losses",
    "grad_reverse",
    "ATTENTION",
    "ATTENTION_AND_CONVS",
    "BACKBONE_FILE",
    "resolve_shipped",
    "LORA_WEIGHT_NAME",
    "Backbone",
    "BackboneConfig",
    "LoraConfig",
    "TinyTextToImagePipeline",
    "TinyUNetConfig",
    "attach_lora",
    "load_adapter",
    "default_text_encoder",
    "lora_state_dict",
    "save_lora",
]

from ._tiny_sd import make_tiny_stable_diffusion  # noqa: E402

__all__ += ["make_tiny_stable_diffusion"]

from ._baselines import (  # noqa: E402
    FairDiffusionConfig,
    FairDiffusionPipeline,
    SemanticGuidance,
    fair_diffusion_sample,
)
from ._prompt_augmentation import (  # noqa: E402
    PromptAugmentationConfig,
    augment_prompts,
    draw_classes,
    unet_evals_per_image,
)

__all__ += [
    "FairDiffusionConfig",
    "FairDiffusionPipeline",
    "PromptAugmentationConfig",
    "SemanticGuidance",
    "augment_prompts",
    "draw_classes",
    "fair_diffusion_sample",
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
