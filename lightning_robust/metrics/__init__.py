"""torchmetrics metrics and evaluation functions: certified accuracy, text-attack evaluation, ..."""

from lightning_robust.metrics.certified_accuracy import CertifiedAccuracy, certified_accuracy
from lightning_robust.metrics.image_quality import ClassifierFeatures, PrecomputedFeatures, image_quality
from lightning_robust.metrics.perplexity import (
    evaluate_text_attack,
    load_causal_lm,
    load_word_lm,
    per_word_perplexity,
    sliding_windows,
    train_causal_lm,
    train_word_lm,
)
from lightning_robust.metrics.poison_detection import PoisonDetection, poison_detection_scores
from lightning_robust.metrics.robust_accuracy import RobustAccuracy
from lightning_robust.metrics.topk_intersection import TopKIntersection

__all__ = [
    "CertifiedAccuracy",
    "ClassifierFeatures",
    "PoisonDetection",
    "PrecomputedFeatures",
    "RobustAccuracy",
    "TopKIntersection",
    "certified_accuracy",
    "evaluate_text_attack",
    "image_quality",
    "load_causal_lm",
    "load_word_lm",
    "per_word_perplexity",
    "poison_detection_scores",
    "sliding_windows",
    "train_causal_lm",
    "train_word_lm",
]
