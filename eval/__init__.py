"""Judges, fairness / fidelity / quality metrics, and (later) the comparison harness."""

from ._harness import (
    GenerationConfig,
    evaluate_backbone_on_digits,
    generate,
    judge_digit_images,
)
from ._judges import (
    UNDETERMINED,
    HueJudge,
    Judges,
    JudgeTrainConfig,
    SmallCNN,
    images_from_table,
    ink_map,
    load_judges,
    perturb,
    rgb_to_hue_chroma,
    train_attribute_classifier,
    train_judges,
)
from ._metrics import (
    KL_EPS,
    ConceptResult,
    bootstrap_ci,
    concept_metrics,
    deviation,
    fairness_discrepancy,
    fidelity,
    frechet_distance,
    kl_divergence,
    noise_floor,
    proportions,
    shen_bias,
)

__all__ = [
    "GenerationConfig",
    "evaluate_backbone_on_digits",
    "generate",
    "judge_digit_images",
    "KL_EPS",
    "UNDETERMINED",
    "ConceptResult",
    "HueJudge",
    "JudgeTrainConfig",
    "Judges",
    "SmallCNN",
    "bootstrap_ci",
    "concept_metrics",
    "deviation",
    "fairness_discrepancy",
    "fidelity",
    "frechet_distance",
    "images_from_table",
    "ink_map",
    "kl_divergence",
    "load_judges",
    "noise_floor",
    "perturb",
    "proportions",
    "rgb_to_hue_chroma",
    "shen_bias",
    "train_attribute_classifier",
    "train_judges",
]

# The comparison (``fairtune compare`` / ``fairtune audit``) needs diffusers, the baselines and the
# training package's classifier loader: imported on first use, so ``import fairtune.eval`` stays light.
_COMPARE_EXPORTS = {
    "CompareConfig": "._compare",
    "JudgeConfig": "._compare",
    "JudgePanel": "._compare",
    "MethodConfig": "._compare",
    "PromptEntry": "._compare",
    "PromptGroup": "._compare",
    "audit": "._compare",
    "build_judges": "._compare",
    "compare_methods": "._compare",
    "colored_digits_prompts": "._compare",
    "load_prompt_file": "._compare",
    "load_reference_images": "._compare",
    "mean_deviation_interval": "._compare",
    "run_comparison": "._compare",
    "write_metrics": "._compare",
    "summary_markdown": "._report",
    "write_report": "._report",
}
__all__ += list(_COMPARE_EXPORTS)


def __getattr__(name: str):
    if name in _COMPARE_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_COMPARE_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
