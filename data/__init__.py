"""Records, targets, data sources (tables, webdataset shards) and the ColoredDigits-Bias benchmark."""

from ._colored_digits import (
    BACKGROUND,
    DEFAULT_RED_SHARE,
    INK,
    ColoredDigitsConfig,
    concept_name,
    explicit_prompt,
    ink_hue,
    neutral_prompt,
    render,
)
from ._colored_digits import (
    build as build_colored_digits,
)
from ._colored_digits import (
    generate as generate_colored_digits,
)
from ._datamodule import AttributeDataModule, CachedRecord, SourceConfig, to_pixels
from ._latents import LatentCacheConfig, LatentEntry, cache_key, default_cache_dir, load_or_build
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
from ._streaming import (
    ShardLoader,
    StreamingRebalancedDataset,
    index_path,
    load_index,
    scan_shard,
    write_index,
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
    "ink_hue",
    "load_table",
    "neutral_prompt",
    "render",
    "validate_record",
    "write_shards",
    "CachedRecord",
    "LatentCacheConfig",
    "LatentEntry",
    "cache_key",
    "default_cache_dir",
    "load_or_build",
    "ShardLoader",
    "StreamingRebalancedDataset",
    "index_path",
    "load_index",
    "scan_shard",
    "write_index",
]
