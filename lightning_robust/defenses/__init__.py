"""Poison filters as pure functions on features: ``(features [n, d], labels [n]) -> keep mask [n]``."""

from lightning_robust.defenses.baselines import l2_outlier_filter, one_class_svm_filter, random_eviction
from lightning_robust.defenses.deep_knn import (
    CLASS_BALANCES,
    TIE_BREAKS,
    deep_knn_filter,
    default_k,
    knn_vote_counts,
    plurality_keep,
)

__all__ = [
    "CLASS_BALANCES",
    "TIE_BREAKS",
    "deep_knn_filter",
    "default_k",
    "knn_vote_counts",
    "l2_outlier_filter",
    "one_class_svm_filter",
    "plurality_keep",
    "random_eviction",
]
