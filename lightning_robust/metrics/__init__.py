"""Metrics: text-attack evaluation (per-word perplexity under a causal LM, attack statistics); more by later issues."""

from lightning_robust.metrics.perplexity import (
    evaluate_text_attack,
    load_causal_lm,
    per_word_perplexity,
    train_causal_lm,
)

__all__ = ["evaluate_text_attack", "load_causal_lm", "per_word_perplexity", "train_causal_lm"]
