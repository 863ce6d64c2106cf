"""Writers of tiny data sets in the real on-disk formats (CIFAR pickles, IDX, CelebA, VisDA, MNIST-M).

Each writer returns what it wrote (arrays, labels, names) so tests can compare readers against it.
Images are random but reproducible (``seed``). ``manifest=True`` adds an ``MD5SUMS`` file (the tiny
files cannot match the official checksums).
"""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lightning_robust.datamodules.integrity import write_checksum_manifest

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VISDA_NAMES = ["aeroplane", "bicycle", "bus", "car", "horse", "knife", "motorcycle", "person", "plant",
               "skateboard", "train", "truck"]


def _labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    # Every class present (cyclic), then shuffled: class-count tests stay meaningful on tiny sets.
    y = np.arange(n) % k
    rng.shuffle(y)
    return y


def write_cifar(root: Path, n_per_batch: int = 20, n_test: int = 30, seed: int = 0, manifest: bool = True,
                archive: bool = False) -> dict[str, Any]:
    """``root/cifar-10-batches-py`` with 5 training batches and a test batch (Python-2-style keys)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"train_x": [], "train_y": []}
    for i in range(1, 7):
        n = n_per_batch if i < 6 else n_test
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = _labels(rng, n, 10).tolist()
        name = f"data_batch_{i}" if i < 6 else "test_batch"
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": f"batch {i}", "labels": labels, "data": data,
                         "filenames": [f"img_{i}_{j}.png" for j in range(n)]}, f, protocol=2)
        if i < 6:
            out["train_x"].append(data)
            out["train_y"].extend(labels)
        else:
            out["test_x"], out["test_y"] = data, labels
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_NAMES, "num_cases_per_batch": n_per_batch, "num_vis": 3072}, f, protocol=2)
    out["train_x"] = np.concatenate(out["train_x"]).reshape(-1, 3, 32, 32)
    out["test_x"] = out["test_x"].reshape(-1, 3, 32, 32)
    if archive:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tf:
            tf.add(folder, arcname="cifar-10-batches-py")
    if manifest:
        files = [p.relative_to(root) for p in sorted(folder.iterdir())]
        if archive:
            files.append(Path("cifar-10-python.tar.gz"))
        out["manifest"] = write_checksum_manifest(root, files)
    out["folder"] = folder
    return out


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file (unsigned byte data) holding ``array``."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(folder: Path, n_train: int = 40, n_test: int = 30, seed: int = 0, gz: bool = True,
                manifest: bool = True, splits: tuple[str, ...] = ("train", "test")) -> dict[str, Any]:
    """IDX files (``.gz`` when ``gz``) for the requested splits, directly in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    names = []
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = _labels(rng, n, 10).astype(np.uint8)
        out[f"{split}_x"], out[f"{split}_y"] = x, y
        if split not in splits:
            continue
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            name = f"{prefix}-{kind}-ubyte" + (".gz" if gz else "")
            data = idx_bytes(arr)
            (folder / name).write_bytes(gzip.compress(data) if gz else data)
            names.append(name)
    if manifest:
        out["manifest"] = write_checksum_manifest(folder, names)
    return out


def _write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_celeba(root: Path, n: int = 24, seed: int = 0, size: tuple[int, int] = (36, 44), manifest: bool = True,
                 ext: str = "png") -> dict[str, Any]:
    """``root/celeba/`` with ``img_align_celeba/`` and all five annotation files (torchvision layout)."""
    rng = np.random.default_rng(seed)
    folder = root / "celeba"
    img_dir = folder / "img_align_celeba"
    names = [f"{i + 1:06d}.{ext}" for i in range(n)]
    attr_names = ["5_o_Clock_Shadow", "Male", "Smiling", "Young"]
    attrs = rng.integers(0, 2, size=(n, len(attr_names)))
    attrs[:, 1] = np.arange(n) % 2  # "Male" balanced, for class tests
    parts = np.array([0] * (n // 2) + [1] * (n // 4) + [2] * (n - n // 2 - n // 4))
    for name in names:
        _write_image(img_dir / name, rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    lines = [str(n), " ".join(attr_names)]
    lines += [name + " " + " ".join("1" if a else "-1" for a in row) for name, row in zip(names, attrs)]
    (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (folder / "list_eval_partition.txt").write_text("".join(f"{nm} {p}\n" for nm, p in zip(names, parts)))
    ids = rng.integers(1, 6, size=n)
    (folder / "identity_CelebA.txt").write_text("".join(f"{nm} {i}\n" for nm, i in zip(names, ids)))
    (folder / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n" + "".join(f"{nm} 1 2 3 4\n" for nm in names))
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x "
        "rightmouth_y\n" + "".join(f"{nm} " + " ".join(["5"] * 10) + "\n" for nm in names))
    out: dict[str, Any] = {"folder": folder, "names": names, "attr_names": attr_names, "attrs": attrs,
                           "partition": parts, "identity": ids}
    if manifest:
        out["manifest"] = write_checksum_manifest(folder)
    return out


def write_visda(root: Path, per_class: int = 2, seed: int = 0, classes: int = 12, size: tuple[int, int] = (40, 30),
                manifest: bool = False) -> dict[str, Any]:
    """``root/train`` (PNG renderings) and ``root/validation`` (JPEG crops) with ``image_list.txt``."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for domain, ext in (("train", "png"), ("validation", "jpg")):
        lines, labels = [], []
        for k in range(classes):
            for j in range(per_class):
                rel = f"{VISDA_NAMES[k]}/{domain[:3]}_{k}_{j}.{ext}"
                w, h = size[0] + int(rng.integers(0, 9)), size[1] + int(rng.integers(0, 9))
                _write_image(root / domain / rel, rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
                lines.append(f"{rel} {k}")
                labels.append(k)
        (root / domain / "image_list.txt").write_text("\n".join(lines) + "\n")
        out[domain] = labels
    if manifest:
        out["manifest"] = write_checksum_manifest(root)
    return out


def write_mnist_m(root: Path, n_train: int = 30, n_test: int = 20, seed: int = 0, manifest: bool = False
                  ) -> dict[str, Any]:
    """``root/mnist_m/`` in Ganin's distributed layout (PNG folders + ``*_labels.txt``)."""
    rng = np.random.default_rng(seed)
    folder = root / "mnist_m"
    out: dict[str, Any] = {"folder": folder}
    for split, n in (("train", n_train), ("test", n_test)):
        y = _labels(rng, n, 10)
        xs = rng.integers(0, 256, size=(n, 28, 28, 3), dtype=np.uint8)
        lines = []
        for i in range(n):
            _write_image(folder / f"mnist_m_{split}" / f"{i:08d}.png", xs[i])
            lines.append(f"{i:08d}.png {y[i]}")
        (folder / f"mnist_m_{split}_labels.txt").write_text("\n".join(lines) + "\n")
        out[f"{split}_x"], out[f"{split}_y"] = xs, y
    if manifest:
        out["manifest"] = write_checksum_manifest(folder)
    return out


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte of ``path`` (the middle one by default)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.6) -> None:
    """Cut ``path`` to a fraction of its length."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
