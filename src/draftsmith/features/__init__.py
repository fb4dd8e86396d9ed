"""Target features for training: computed online per batch, or read from a versioned cache.

- `online.compute_features` is the single function both modes use (an fp32 cache equals the
  online features bitwise); `online.OnlineFeatures` is what the train loop calls per batch.
- `cache.build_cache` writes a sharded, resumable safetensors cache; `cache.FeatureCache.open`
  validates and reads it.
- `estimate.estimate` gives the cache's size (and DeepSpec's layout's) before anything is written.
- `commands` implements `draftsmith cache estimate|build`.
"""

from draftsmith.features.cache import BuildReport, FeatureCache, FeatureCacheError, build_cache
from draftsmith.features.estimate import Estimate, estimate
from draftsmith.features.online import (
    FeaturePolicy, OnlineFeatures, OnlineFeaturesConfig, SampleFeatures, compute_features,
    supervised_hidden_mask,
)

__all__ = [
    "BuildReport", "Estimate", "FeatureCache", "FeatureCacheError", "FeaturePolicy", "OnlineFeatures",
    "OnlineFeaturesConfig", "SampleFeatures", "build_cache", "compute_features", "estimate",
    "supervised_hidden_mask",
]
