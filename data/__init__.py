"""Records, targets, data sources (tables, webdataset shards) and the ColoredDigits-Bias benchmark."""

from ._colored_digits import (
    BACKGROUND,
    DEFAULT_RED_SHARE,
    INK,
    ColoredDigitsConfig,
    InkMap,
    concept_name,
    explicit_prompt,
    ink_alpha,
    ink_hue,
    ink_map,
    mixed_ink,
    neutral_prompt,
    perturb,
    random_shift,
    render,
    rgb_to_hue_chroma,
)
from ._colored_digits import (
    build as build_colored_digits,
)
from ._colored_digits import (
    generate as generate_colored_digits,
)
from ._datamodule import AttributeDataModule, SourceConfig, to_pixels
from ._images import images_from_table
from ._sampler import RebalanceConfig, WeightedEpochSampler, rebalance_weights
from ._schema import (
    AttributeSpec,
    Record,
    SchemaError,
    Target,
    TargetConfig,
    group_counts,
    validate_record,
)
from ._sources import (
    ColumnMap,
    ShardDataset,
    TableDataset,
    collate_records,
    decode_image,
    expand_shards,
    load_table,
    write_shards,
)

__all__ = [
    "AttributeDataModule",
    "RebalanceConfig",
    "SourceConfig",
    "WeightedEpochSampler",
    "rebalance_weights",
    "to_pixels",
    "BACKGROUND",
    "DEFAULT_RED_SHARE",
    "INK",
    "AttributeSpec",
    "ColoredDigitsConfig",
    "ColumnMap",
    "Record",
    "SchemaError",
    "ShardDataset",
    "TableDataset",
    "Target",
    "TargetConfig",
    "build_colored_digits",
    "collate_records",
    "concept_name",
    "decode_image",
    "expand_shards",
    "explicit_prompt",
    "generate_colored_digits",
    "group_counts",
    "ink_alpha",
    "ink_hue",
    "InkMap",
    "ink_map",
    "images_from_table",
    "mixed_ink",
    "perturb",
    "random_shift",
    "rgb_to_hue_chroma",
    "load_table",
    "neutral_prompt",
    "render",
    "validate_record",
    "write_shards",
]
