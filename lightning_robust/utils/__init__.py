"""Utilities: epoch means of training logs, mode guard and layer lookup, feature hooks, batch adapters,
checkpoint loading, checks, figures."""

from lightning_robust.utils.batch import Batch, split_batch
from lightning_robust.utils.checkpoint import (
    CheckpointError,
    WeightsOnlyLoadFromCheckpoint,
    extract_state_dict,
    load_module,
    safe_load,
)
from lightning_robust.utils.epoch_means import EpochMeans
from lightning_robust.utils.feature_extractor import FeatureExtractor
from lightning_robust.utils.image_logging import log_image
from lightning_robust.utils.modules import MODEL_MODES, model_mode, resolve_layer
from lightning_robust.utils.params import count_parameters
from lightning_robust.utils.rng import keyed_generator
from lightning_robust.utils.text import HFTokenizer, WordVocabulary, basic_tokenize, highlight_changes, load_glove

__all__ = [
    "Batch",
    "CheckpointError",
    "EpochMeans",
    "FeatureExtractor",
    "HFTokenizer",
    "MODEL_MODES",
    "WeightsOnlyLoadFromCheckpoint",
    "WordVocabulary",
    "basic_tokenize",
    "count_parameters",
    "extract_state_dict",
    "highlight_changes",
    "keyed_generator",
    "load_glove",
    "load_module",
    "log_image",
    "model_mode",
    "resolve_layer",
    "safe_load",
    "split_batch",
]
