"""A small causal word-level language model with an adaptive softmax, for per-word perplexity on CPU.

Scoring adversarial reviews needs a language model whose context covers a whole review (IMDB reviews average
about 270 words) and whose vocabulary is the classifier's (every word an attack produces must be scored as
itself, not as ``<unk>``). A full 20k-word softmax dominates the cost of such a model on a CPU;
``nn.AdaptiveLogSoftmaxWithLoss`` (Grave et al. 2017, arXiv 1609.04309) splits the vocabulary by frequency so
that the frequent head is scored in full and the rare tails only for the words that occur, at a fraction of
the cost, while still giving exact normalised log-probabilities.

The model is a pre-norm Transformer decoder (learned positions, causal self-attention) over word ids.
:meth:`WordLanguageModel.token_log_probs` returns ``log p(x_t | x_<t)`` for every next token, which is what
:func:`~lightning_robust.metrics.per_word_perplexity` uses when a model provides it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from lightning_robust.utils.validation import check_fraction, check_positive_int

__all__ = ["WordLanguageModel"]


class WordLanguageModel(nn.Module):
    """Causal Transformer language model over word ids with an adaptive softmax output.

    Args:
        vocab_size: number of word ids (the classifier's vocabulary plus any extra tokens, e.g. ``<bos>``;
            default: the 20,000-word GloVe vocabulary plus ``<bos>``).
        context: the longest sequence scored at once (positions), in tokens.
        dim: model width.
        layers: Transformer blocks.
        heads: attention heads.
        ff: feed-forward width.
        cutoffs: adaptive-softmax frequency cutoffs (word ids are assumed sorted by frequency, as those of
            :class:`~lightning_robust.utils.text.WordVocabulary` are).
        dropout: dropout in the blocks and on the embeddings (training only).

    Raises:
        ValueError: on non-positive sizes, cutoffs not increasing inside ``(0, vocab_size)``, or ``dim`` not
            divisible by ``heads``.

    Example:
        >>> lm = WordLanguageModel(vocab_size=20001, context=256)
        >>> logp = lm.token_log_probs(ids, mask)   # [B, T - 1]: log p(ids[:, t] | ids[:, :t])
    """

    def __init__(self, vocab_size: int = 20001, context: int = 256, dim: int = 128, layers: int = 2, heads: int = 4,
                 ff: int = 512, cutoffs: Sequence[int] = (2000, 8000), dropout: float = 0.1) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size, minimum=3)
        check_positive_int("context", context, minimum=2)
        check_positive_int("dim", dim)
        check_positive_int("layers", layers)
        check_positive_int("heads", heads)
        check_positive_int("ff", ff)
        check_fraction("dropout", dropout)
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        cuts = [int(c) for c in cutoffs]
        if not cuts or any(b <= a for a, b in itertools.pairwise(cuts)) or cuts[0] <= 0 or cuts[-1] >= vocab_size:
            raise ValueError(f"cutoffs must increase strictly inside (0, vocab_size={vocab_size}), got {list(cutoffs)}")
        self.config = {"vocab_size": vocab_size, "context": context, "dim": dim, "layers": layers, "heads": heads,
                       "ff": ff, "cutoffs": cuts, "dropout": dropout}
        self.max_positions = context
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(context, dim)
        self.drop = nn.Dropout(dropout)
        block = nn.TransformerEncoderLayer(dim, heads, ff, dropout=dropout, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.AdaptiveLogSoftmaxWithLoss(dim, vocab_size, cuts, div_value=4.0)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T, dim]`` hidden states; position ``t`` sees tokens ``0..t`` only."""
        T = input_ids.shape[1]
        if self.max_positions < T:
            raise ValueError(f"input_ids has {T} tokens, more than the model's context of {self.max_positions}")
        pos = torch.arange(T, device=input_ids.device)
        h = self.drop(self.tokens(input_ids) + self.positions(pos))
        causal = torch.triu(torch.full((T, T), float("-inf"), device=input_ids.device), diagonal=1)
        # Right padding only: a real token never attends to a later (padded) position, so no key mask is needed.
        return self.norm(self.blocks(h, mask=causal, is_causal=True))

    def token_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T - 1]``: ``log p(input_ids[:, t] | input_ids[:, :t])`` for ``t >= 1`` (0 where masked)."""
        h = self.hidden(input_ids)[:, :-1]
        target = input_ids[:, 1:]
        flat = self.out(h.reshape(-1, h.shape[-1]), target.reshape(-1)).output.view(target.shape)
        if attention_mask is not None:
            flat = flat * attention_mask[:, 1:].to(flat.dtype)
        return flat

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token negative log-likelihood of full (unpadded) windows."""
        return -self.token_log_probs(input_ids).mean()
