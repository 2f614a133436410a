"""Evaluation: generation for judging, judges, the one scoring engine, compare / audit and reports.

``fairtune.eval`` imports only ``fairtune.data`` and ``fairtune.models``.
"""

from ._benchmark import (
    colored_digits_prompts,
    digit_entries,
    evaluate_backbone_on_digits,
    judge_colored_digits,
    judge_digit_images,
    load_benchmark_judges,
)
from ._colored_digits import UNDETERMINED, HueJudge, Judges, JudgeTrainConfig, load_judges, train_judges
from ._compare import (
    audit,
    backbone_for_model,
    compare_methods,
    judge_method,
    run_comparison,
    write_metrics,
)
from ._config import (
    ROLES,
    CompareConfig,
    JudgeConfig,
    MethodConfig,
    PromptEntry,
    PromptGroup,
    load_prompt_file,
    prompt_entries,
)
from ._generation import GenerationConfig, MethodImages, generate, generate_method, images_fingerprint
from ._metrics import (
    KL_EPS,
    deviation,
    fairness_discrepancy,
    fidelity,
    frechet_distance,
    kl_divergence,
    noise_floor,
    proportions,
    shen_bias,
)
from ._panel import JudgePanel, build_judges, build_target, colored_digits_panel, load_reference_images
from ._report import summary_markdown, write_report
from ._scoring import (
    exact_interval,
    mean_interval,
    metric_intervals,
    score_concept,
    score_judged,
    share_box,
    summarize,
    wilson_interval,
)

__all__ = [
    "KL_EPS",
    "ROLES",
    "UNDETERMINED",
    "CompareConfig",
    "GenerationConfig",
    "HueJudge",
    "JudgeConfig",
    "JudgePanel",
    "JudgeTrainConfig",
    "Judges",
    "MethodConfig",
    "MethodImages",
    "PromptEntry",
    "PromptGroup",
    "audit",
    "backbone_for_model",
    "build_judges",
    "build_target",
    "colored_digits_panel",
    "colored_digits_prompts",
    "compare_methods",
    "deviation",
    "digit_entries",
    "evaluate_backbone_on_digits",
    "fairness_discrepancy",
    "fidelity",
    "frechet_distance",
    "generate",
    "generate_method",
    "images_fingerprint",
    "judge_colored_digits",
    "judge_digit_images",
    "judge_method",
    "kl_divergence",
    "load_benchmark_judges",
    "load_judges",
    "load_prompt_file",
    "load_reference_images",
    "exact_interval",
    "mean_interval",
    "metric_intervals",
    "noise_floor",
    "prompt_entries",
    "proportions",
    "run_comparison",
    "score_concept",
    "score_judged",
    "share_box",
    "shen_bias",
    "summarize",
    "summary_markdown",
    "train_judges",
    "wilson_interval",
    "write_metrics",
    "write_report",
]
