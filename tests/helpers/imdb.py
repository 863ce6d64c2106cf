"""Tiny data sets in the IMDB layout (``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt``), made on the fly."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

__all__ = ["POSITIVE", "NEGATIVE", "make_imdb_folder", "make_imdb_tar", "synthetic_review"]

POSITIVE = ["great", "good", "wonderful", "excellent", "brilliant", "fun"]
NEGATIVE = ["bad", "awful", "boring", "terrible", "dull", "poor"]
NEUTRAL = ["the", "movie", "film", "plot", "actor", "story", "was", "a", "and", "it", "scene", "director"]


def synthetic_review(label: int, rng: random.Random, length: int = 12) -> str:
    """A review of neutral words with two sentiment words of the label's side (1 = positive)."""
    words = [rng.choice(NEUTRAL) for _ in range(length)]
    side = POSITIVE if label == 1 else NEGATIVE
    for _ in range(2):
        words[rng.randrange(length)] = rng.choice(side)
    return " ".join(words).capitalize() + ".<br /><br />" + rng.choice(["Really.", "Truly!", "Yes."])


def make_imdb_folder(root: str | Path, n_train: int = 8, n_test: int = 4, seed: int = 0, length: int = 12) -> Path:
    """Write ``root/aclImdb`` with ``n_train`` / ``n_test`` reviews per label; return ``root``."""
    rng = random.Random(seed)
    root = Path(root)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, folder in ((0, "neg"), (1, "pos")):
            d = root / "aclImdb" / split / folder
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rating = rng.randint(7, 10) if label else rng.randint(1, 4)
                (d / f"{i}_{rating}.txt").write_text(synthetic_review(label, rng, length), encoding="utf-8")
    (root / "aclImdb" / "README").write_text("tiny test copy\n")
    return root


def make_imdb_tar(folder_root: str | Path, archive: str | Path, extra: dict[str, bytes] | None = None,
                  symlink: tuple[str, str] | None = None) -> Path:
    """Pack ``folder_root/aclImdb`` into ``archive`` (gzip), plus ``extra`` raw members and an optional symlink."""
    archive = Path(archive)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(Path(folder_root) / "aclImdb", arcname="aclImdb")
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink is not None:
            info = tarfile.TarInfo(symlink[0])
            info.type = tarfile.SYMTYPE
            info.linkname = symlink[1]
            tar.addfile(info)
    return archive
