"""Samples per second of CIFAR10DataModule's train loader against torchvision's CIFAR10 in a plain DataLoader.

Both read the same generated CIFAR-format data set of realistic size (5 training batches of 10,000 random
32x32 colour images in the official python-pickle format, plus the test batch and ``batches.meta``) and
apply the same training transform: zero-pad 4, random 32x32 crop, random horizontal flip, to float in
[0, 1]. torchvision does it per image on PIL images (``RandomCrop(32, padding=4)``,
``RandomHorizontalFlip()``, ``ToTensor()``); the DataModule does it per batch on a uint8 tensor.
torchvision is given the generated files' MD5s, so both sides verify checksums while loading.

Measured: the median time to draw the same number of shuffled batches of 128 (from a fresh loader, so
worker start-up is included for both), and the one-off load time (checksums + unpickling).
"""

from __future__ import annotations

import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from benchmarks.common import markdown_table, timeit
from lightning_robust.datamodules import CIFAR10DataModule, write_checksum_manifest
from lightning_robust.datamodules.integrity import md5sum

BATCH = 128


def _write(root: Path, per_batch: int, n_test: int) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 7):
        n = per_batch if i < 6 else n_test
        d = {"batch_label": f"batch {i}", "labels": rng.integers(0, 10, n).tolist(),
             "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{j}.png" for j in range(n)]}
        with open(folder / (f"data_batch_{i}" if i < 6 else "test_batch"), "wb") as f:
            pickle.dump(d, f, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return write_checksum_manifest(root, [p.relative_to(root) for p in sorted(folder.iterdir())])


def _torchvision_dataset(root: Path) -> Any:
    import torchvision
    from torchvision import transforms

    folder = root / "cifar-10-batches-py"

    class GeneratedCIFAR10(torchvision.datasets.CIFAR10):
        # torchvision verifies these MD5s in its constructor, as with the official files.
        train_list = [[f"data_batch_{i}", md5sum(folder / f"data_batch_{i}")] for i in range(1, 6)]  # noqa: RUF012
        test_list = [["test_batch", md5sum(folder / "test_batch")]]  # noqa: RUF012
        meta = {"filename": "batches.meta", "key": "label_names", "md5": md5sum(folder / "batches.meta")}  # noqa: RUF012

    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor()])
    return GeneratedCIFAR10(str(root), train=True, transform=tf)


def _draw(loader: DataLoader, n_batches: int) -> int:
    seen = 0
    for k, batch in enumerate(loader):
        seen += int(batch[0].shape[0])
        if k + 1 == n_batches:
            break
    return seen


def run(quick: bool = False) -> str:
    per_batch, n_batches, repeat = (1000, 8, 1) if quick else (10_000, 100, 3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = _write(root, per_batch, per_batch)
        t0 = time.perf_counter()
        tv = _torchvision_dataset(root)
        tv_load = time.perf_counter() - t0

        def ours(workers: int, with_index: bool = False) -> CIFAR10DataModule:
            dm = CIFAR10DataModule(str(root), checksums=str(manifest), batch_size=BATCH, num_workers=workers,
                                   persistent_workers=False, val_fraction=0.0, with_index=with_index)
            dm.setup("fit")
            return dm

        t0 = time.perf_counter()
        ours(0)
        our_load = time.perf_counter() - t0
        for workers in ((0,) if quick else (0, 2)):
            dm, dmi = ours(workers), ours(workers, with_index=True)
            t_tv = timeit(lambda w=workers: _draw(DataLoader(tv, BATCH, shuffle=True, num_workers=w), n_batches),
                          repeat=repeat, warmup=0)
            t_dm = timeit(lambda d=dm: _draw(d.train_dataloader(), n_batches), repeat=repeat, warmup=0)
            t_dmi = timeit(lambda d=dmi: _draw(d.train_dataloader(), n_batches), repeat=repeat, warmup=0)
            n = n_batches * BATCH
            rows.append([f"torchvision CIFAR10 + DataLoader, {workers} workers", round(n / t_tv), 1.0])
            rows.append([f"CIFAR10DataModule, {workers} workers", round(n / t_dm), t_tv / t_dm])
            rows.append([f"CIFAR10DataModule with_index=True, {workers} workers", round(n / t_dmi), t_tv / t_dmi])
    return (
        f"### CIFAR-10 train loader throughput ({5 * per_batch} generated images, batch {BATCH}, "
        f"random crop + flip, {n_batches} batches per timing)\n\n"
        + markdown_table(["loader", "samples/s (median)", "ratio to torchvision"], rows)
        + f"\n\nOne-off load (MD5 checks + unpickling): torchvision {tv_load:.2f} s, CIFAR10DataModule "
        f"{our_load:.2f} s."
    )


if __name__ == "__main__":
    print(run(quick=True))
