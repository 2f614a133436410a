"""Draw training records so each concept's groups follow the target mix (DESIGN §4.1).

Importance reweighting (Choi et al., ICML 2020): within each concept a record of group g gets weight
``target(g) / empirical(g)``, so a weighted draw meets the target while every concept keeps its share
of the data. The draw of an epoch is a function of (seed, epoch) alone and is dealt to DDP ranks like
``DistributedSampler`` (rank r takes draws r, r+W, ...): no overlap, together the whole draw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Sampler

from ._schema import SchemaError, Target


@dataclass
class RebalanceConfig:
    """The rebalanced sampler (lever 1).

    Attributes:
        unknown: What a record with an unknown attribute label gets: ``"keep"`` (weight 1, as
            without the lever) or ``"drop"`` (never drawn).
    """

    unknown: Literal["keep", "drop"] = "keep"


def rebalance_weights(
    concepts: Sequence[str],
    groups: Sequence[int],
    target: Target,
    *,
    unknown: Literal["keep", "drop"] = "keep",
) -> torch.Tensor:
    """Per-record weights ``target(g) / empirical(g)`` within each concept.

    Within a concept, the labelled records' weights sum to their count, so concepts keep their share
    of the draw; an unknown-label record weighs 1 (``keep``) or 0 (``drop``).

    Raises:
        SchemaError: a concept has no record of a group whose target proportion is positive.
    """
    target.check_coverage(concepts, groups)
    n = len(concepts)
    w = torch.zeros(n, dtype=torch.float64)
    by_concept: dict[str, list[int]] = {}
    for i, c in enumerate(concepts):
        by_concept.setdefault(c, []).append(i)
    for concept, idx in by_concept.items():
        q = target.proportions(concept)
        known = [i for i in idx if groups[i] >= 0]
        counts = [0] * len(q)
        for i in known:
            counts[groups[i]] += 1
        for i in idx:
            g = groups[i]
            if g < 0:
                w[i] = 1.0 if unknown == "keep" else 0.0
            else:
                w[i] = q[g] * len(known) / counts[g]
    if not torch.any(w > 0):
        raise SchemaError("no record can be drawn: every weight is zero")
    return w


class WeightedEpochSampler(Sampler[int]):
    """Draws ``num_samples`` indices with replacement by ``weights``, the same for a given (seed, epoch).

    With uniform weights it is the plain (no-lever) control; with :func:`rebalance_weights` it is the
    rebalanced sampler. Under DDP each rank yields its own ``num_samples / world_size`` draws.

    Args:
        weights: Per-record weights (need not sum to 1).
        num_samples: Draws per epoch across all ranks (default: number of records).
        seed: Base seed; the epoch's draw uses ``seed`` and ``epoch`` only.
        rank: This process's rank (default from torch.distributed, else 0).
        world_size: Number of ranks (default from torch.distributed, else 1).
    """

    def __init__(
        self,
        weights: torch.Tensor | Sequence[float],
        *,
        num_samples: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        from ._sources import rank_info

        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        r, w = rank_info()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        total = len(self.weights) if num_samples is None else num_samples
        # Round the epoch up to a multiple of the world size so every rank draws as many.
        self.total = -(-total // self.world_size) * self.world_size
        self.seed = seed
        self.epoch = 0
        self.skip = 0  # draws of this rank's epoch already consumed (a resumed run): skipped once

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning (and DDP loops) at the start of each epoch."""
        self.epoch = epoch

    def epoch_draw(self) -> torch.Tensor:
        """The whole epoch's draw, before it is dealt to ranks (numpy: no limit on the record count)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        p = self.weights.numpy()
        return torch.from_numpy(rng.choice(len(p), size=self.total, replace=True, p=p / p.sum()))

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(self.epoch_draw()[self.rank :: self.world_size][skip:].tolist())

    def __len__(self) -> int:
        return self.total // self.world_size
