"""One-shot GPU benchmark (issue 25, item 7): every method's LightningModule and the peer comparisons.

``python -m benchmarks.gpu --out gpu.md`` on one CUDA GPU:

* every LightningModule trains a fixed number of steps at paper-scale shapes on random tensors (random
  weights, nothing downloaded): CIFAR-10-sized images with ResNet-18 (PGD adversarial training, ARD with a
  WideResNet teacher, interpretation-regularized training), DCGAN at 64x64 (GAN, NW-GAN, Entropic GAN,
  GAN distillation), a BERT-base-sized text encoder (SPGD adversarial training), NW domain adaptation
  on 32x32 images. Per module: steps/s after a warm-up, peak GPU memory, and that every logged value and
  weight is finite. Mixed precision is ``bf16-mixed`` on CUDA (``--precision`` to change);
  ``--compile`` also runs the Classifier with a ``torch.compile``-d net.
* the Classifier's Trainer against a plain PyTorch loop doing the same work (PGD-10 + cross-entropy +
  SGD, same autocast), as the overhead ratio. The other modules' overhead is measured on the CPU by
  ``benchmarks/bench_training_loop.py`` (their manual-optimization steps need the Trainer's plumbing).
* PGD against torchattacks' PGD, Deep k-NN's achieved rate over the GPU's matmul rate and against a
  plain chunked ``cdist`` + ``topk`` brute force, Sinkhorn against POT's log-domain Sinkhorn, SmoothGrad
  against captum's NoiseTunnel (each at equal work; a peer that is not installed skips its row).

It prints a Markdown table and writes it to ``--out``. Meant to finish in under 8 minutes on one H100.
``--quick`` shrinks every shape and step count so that it runs on the CPU in well under a minute (CI
runs it there; its numbers mean nothing). Exit status 1 if any result is not finite or a case fails.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from benchmarks.common import machine_info, markdown_table, matmul_gflops


@dataclass
class Scale:
    """Shapes and step counts: paper scale on a GPU, tiny with ``--quick``."""

    quick: bool
    image: int  # CIFAR-10 side
    gan_image: int  # DCGAN side
    batch: int
    gan_batch: int
    steps: int
    warmup: int
    text_len: int
    knn_n: int
    knn_d: int
    ot_n: int


def scale(quick: bool) -> Scale:
    if quick:
        return Scale(True, image=8, gan_image=32, batch=4, gan_batch=4, steps=2, warmup=1, text_len=8,
                     knn_n=512, knn_d=32, ot_n=64)
    return Scale(False, image=32, gan_image=64, batch=128, gan_batch=64, steps=30, warmup=5, text_len=128,
                 knn_n=50_000, knn_d=512, ot_n=4096)


# -------------------------------------------------------------------------------------------- modules
def _images(s: Scale, n: int, side: int, classes: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 3, side, side, generator=g), torch.randint(0, classes, (n,), generator=g))


def _resnet() -> nn.Module:
    from lightning_robust.nets import ResNet18, SmallCNN

    return ResNet18(num_classes=10) if not _S.quick else SmallCNN(in_channels=3, input_size=_S.image)


def _sgd() -> Any:
    return partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _pgd(steps: int = 10) -> Any:
    from lightning_robust.attacks import PGD

    return PGD(eps=8 / 255, alpha=2 / 255, steps=steps if not _S.quick else 2)


def build_classifier() -> tuple[pl.LightningModule, Dataset]:
    from lightning_robust.models import Classifier

    return Classifier(_resnet(), optimizer=_sgd(), attack=_pgd()), _images(_S, _n(_S.batch), _S.image)


def build_ard() -> tuple[pl.LightningModule, Dataset]:
    from lightning_robust.models import ARDStudent
    from lightning_robust.nets import WideResNet

    teacher = WideResNet(depth=34, widen_factor=10, num_classes=10) if not _S.quick else _resnet()
    return (ARDStudent(_resnet(), teacher.eval(), attack=_pgd(), optimizer=_sgd()),
            _images(_S, _n(_S.batch), _S.image))


def build_interpretation() -> tuple[pl.LightningModule, Dataset]:
    from lightning_robust.models import InterpretationRegularizedClassifier

    return (InterpretationRegularizedClassifier(_resnet(), attack=_pgd(), perturbation="attack", optimizer=_sgd()),
            _images(_S, _n(_S.batch), _S.image))


def _dcgan() -> tuple[nn.Module, nn.Module]:
    from lightning_robust.nets import DCGANDiscriminator, DCGANGenerator

    d = 64 if not _S.quick else 8
    return (DCGANGenerator(image_size=_S.gan_image, channels=3, d=d),
            DCGANDiscriminator(image_size=_S.gan_image, channels=3, d=d))


def _gan_data() -> TensorDataset:
    return _images(_S, _n(_S.gan_batch), _S.gan_image)


def build_gan() -> tuple[pl.LightningModule, Dataset]:
    from lightning_robust.models import GAN

    g, d = _dcgan()
    return GAN(g, d, loss="wgan-gp", n_critic=5), _gan_data()


def build_nw_gan() -> tuple[pl.LightningModule, Dataset]:
    from lightning_robust.models import NWGAN

    g, d = _dcgan()
    return NWGAN(g, d, num_components=3, loss="wgan-gp", n_critic=5), _gan_data()


def build_entropic_gan() -> tuple[pl.LightningModule, Dataset]:
    from lightning_robust.models import EntropicGAN
    from lightning_robust.nets import DualCritic

    g, d = _dcgan()
    return EntropicGAN(g, DualCritic(d, copy.deepcopy(d)), cost="l2", n_critic=5), _gan_data()


def build_distilled_gan() -> tuple[pl.LightningModule, Dataset]:
    from lightning_robust.models import DistilledGAN
    from lightning_robust.nets import DCGANGenerator

    teacher, d = _dcgan()
    student = DCGANGenerator(image_size=_S.gan_image, channels=3, d=16 if not _S.quick else 4)
    return DistilledGAN(teacher.eval(), student, d, mode="joint", loss="wgan-gp", n_critic=5), _gan_data()


def build_nw_domain_adaptation() -> tuple[pl.LightningModule, Dataset]:
    from lightning_robust.models import NWDomainAdaptation
    from lightning_robust.nets import MLP

    features = _resnet()
    features_out = 10  # the ResNet's logits serve as a 10-d feature (shape only matters here)
    model = NWDomainAdaptation(features, nn.Linear(features_out, 10), MLP(features_out, 1, (512, 512)),
                               method="nw", adversarial_every=1)
    src, tgt = _images(_S, _n(_S.batch), _S.image), _images(_S, _n(_S.batch), _S.image)
    return model, _Paired(src, tgt)


class _Paired(Dataset):
    def __init__(self, source: TensorDataset, target: TensorDataset) -> None:
        self.source, self.target = source, target

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"source": self.source[i], "target": self.target[i]}


class _Tokens(Dataset):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1000 if vocab > 2000 else 2, vocab, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def build_text_classifier() -> tuple[pl.LightningModule, Dataset]:
    from transformers import BertConfig

    from lightning_robust.attacks import SPGD
    from lightning_robust.models import TextClassifier
    from lightning_robust.nets import TransformerClassifier

    # BERT-base shapes (768 wide, 12 layers, 30,522 words) with random weights: a local config, no download.
    config = BertConfig() if not _S.quick else BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=200)
    folder = Path(tempfile.mkdtemp(prefix="gpu-bench-bert-"))
    config.save_pretrained(folder)
    net = TransformerClassifier(encoder=str(folder), pretrained=False)
    model = TextClassifier(net, attack=SPGD(max_words=2, steps=3), optimizer=partial(torch.optim.AdamW, lr=2e-5))
    return model, _Tokens(_n(32 if not _S.quick else 4), _S.text_len, config.vocab_size)


MODULES: dict[str, Callable[[], tuple[pl.LightningModule, Dataset]]] = {
    "Classifier (PGD-10 AT, ResNet-18)": build_classifier,
    "ARDStudent (ResNet-18 <- WRN-34-10)": build_ard,
    "InterpretationRegularizedClassifier (ResNet-18)": build_interpretation,
    "GAN (DCGAN 64x64, WGAN-GP)": build_gan,
    "NWGAN (3 DCGAN components)": build_nw_gan,
    "EntropicGAN (DCGAN)": build_entropic_gan,
    "DistilledGAN (DCGAN d=64 -> d=16)": build_distilled_gan,
    "NWDomainAdaptation (ResNet-18 features)": build_nw_domain_adaptation,
    "TextClassifier (BERT-base size, SPGD)": build_text_classifier,
}

_S = scale(True)


def _n(batch: int) -> int:
    """Samples for warm-up plus timed steps (GANs take ``n_critic`` batches per generator step: plenty)."""
    return batch * (_S.warmup + _S.steps + 2)


class _StepTimer(pl.Callback):
    """Wall-clock of the batches after the warm-up (synchronised), and whether every logged value is finite.

    Counts batches, not optimizer steps: a GAN batch is one critic step (a generator step every
    ``n_critic``), a domain-adaptation batch may step three optimizers."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.batches, self.finite = warmup, 0.0, 0, True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        for v in trainer.callback_metrics.values():
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
                self.finite = False
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.batches += 1
        if self.batches == self.warmup:
            self.t0 = time.perf_counter()

    def steps_per_second(self) -> float:
        timed = self.batches - self.warmup
        return timed / (time.perf_counter() - self.t0) if timed > 0 else math.nan


def _fit(model: pl.LightningModule, data: Dataset, batch: int, precision: str) -> tuple[float, float, bool]:
    timer = _StepTimer(_S.warmup)
    trainer = pl.Trainer(accelerator="auto", devices=1, precision=precision,  # type: ignore[arg-type]
                         max_epochs=1, limit_train_batches=_S.warmup + _S.steps, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer], default_root_dir=tempfile.mkdtemp(prefix="gpu-bench-"))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=batch, shuffle=False, drop_last=True))
    mem = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else math.nan
    weights = all(torch.isfinite(p).all() for p in model.parameters())
    return timer.steps_per_second(), mem, timer.finite and bool(weights)


def _plain_classifier_loop(precision: str, device: torch.device) -> float:
    """Steps/s of a hand-written PGD-10 adversarial-training loop on the Classifier's net and data."""
    model, data = build_classifier()
    net = model.net.to(device) if hasattr(model, "net") else model.to(device)
    opt = _sgd()(net.parameters())
    attack = _pgd()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision.startswith("bf16")
                else nullcontext())
    loader = DataLoader(data, batch_size=_S.batch, shuffle=False, drop_last=True)
    t0, done = 0.0, 0
    for i, (x, y) in enumerate(loader):
        if i == _S.warmup + _S.steps:
            break
        x, y = x.to(device), y.to(device)
        with autocast:
            x_adv = attack(net, x, y)
            net.train()
            loss = F.cross_entropy(net(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i + 1 == _S.warmup:
            t0 = time.perf_counter()
        elif i + 1 > _S.warmup:
            done += 1
    return done / (time.perf_counter() - t0) if done else math.nan


def module_rows(precision: str, compile_net: bool, device: torch.device) -> tuple[list[list[Any]], bool]:
    rows: list[list[Any]] = []
    ok = True
    plain = None
    for name, build in MODULES.items():
        try:
            torch.manual_seed(0)
            model, data = build()
            batch = _S.gan_batch if "GAN" in name else (_S.batch if "Text" not in name else 32 if not _S.quick else 4)
            rate, mem, finite = _fit(model, data, batch, precision)
            overhead = "-"
            if name.startswith("Classifier"):
                plain = _plain_classifier_loop(precision, device)
                overhead = f"{plain / rate:.3f}" if rate == rate and plain == plain else "nan"
            rows.append([name, batch, f"{rate:.3g}", f"{mem:.0f}", overhead, "yes" if finite else "NO"])
            ok &= finite
        except Exception as err:  # one broken module must not hide the others' numbers
            traceback.print_exc()
            rows.append([name, "-", "-", "-", "-", f"FAILED: {type(err).__name__}: {str(err)[:80]}"])
            ok = False
    if compile_net:
        try:
            torch.manual_seed(0)
            model, data = build_classifier()
            model.net = torch.compile(model.net)  # type: ignore[assignment]
            rate, mem, finite = _fit(model, data, _S.batch, precision)
            overhead = f"{plain / rate:.3f}" if plain is not None else "-"
            rows.append(["Classifier, torch.compile(net)", _S.batch, f"{rate:.3g}", f"{mem:.0f}", overhead,
                         "yes" if finite else "NO"])
            ok &= finite
        except Exception as err:
            traceback.print_exc()
            rows.append(["Classifier, torch.compile(net)", "-", "-", "-", "-",
                         f"FAILED: {type(err).__name__}: {str(err)[:80]}"])
            ok = False
    return rows, ok


# ---------------------------------------------------------------------------------------------- peers
def _seconds(fn: Callable[[], Any], device: torch.device, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _pgd_row(device: torch.device) -> list[Any]:
    import torchattacks  # noqa: F401  (skips the row when absent)
    from torchattacks import PGD as TAPGD

    from lightning_robust.attacks import PGD

    torch.manual_seed(0)
    net = _resnet().to(device).eval()
    x, y = torch.rand(_S.batch, 3, _S.image, _S.image, device=device), torch.randint(0, 10, (_S.batch,), device=device)
    steps = 10 if not _S.quick else 2
    ours = PGD(eps=8 / 255, alpha=2 / 255, steps=steps, random_start=True)
    theirs = TAPGD(net, eps=8 / 255, alpha=2 / 255, steps=steps, random_start=True)
    t_ours, t_peer = _seconds(lambda: ours(net, x, y), device), _seconds(lambda: theirs(x, y), device)
    finite = bool(torch.isfinite(ours(net, x, y)).all())
    return [f"PGD-{steps} on {type(net).__name__}, batch {_S.batch}", "torchattacks.PGD", t_ours, t_peer,
            f"{t_ours / t_peer:.3f}", "yes" if finite else "NO"]


def _brute_knn(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    out = []
    for lo in range(0, x.shape[0], chunk):
        d = torch.cdist(x[lo:lo + chunk], x)
        d[torch.arange(d.shape[0]), torch.arange(lo, lo + d.shape[0])] = math.inf
        out.append(d.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


def _knn_rows(device: torch.device) -> list[list[Any]]:
    from lightning_robust.defenses import deep_knn_filter

    g = torch.Generator().manual_seed(0)
    n, d = _S.knn_n, _S.knn_d
    y = torch.arange(n) % 10
    x = (2 * torch.randn(10, d, generator=g)[y] + torch.randn(n, d, generator=g)).to(device)
    y = y.to(device)
    t_ours = _seconds(lambda: deep_knn_filter(x, y, 50), device, repeat=2)
    t_brute = _seconds(lambda: _brute_knn(x, 50), device, repeat=2)
    rate = 2.0 * n * n * d / t_ours / 1e9
    mm = matmul_gflops(4096 if device.type == "cuda" and not _S.quick else 512, device=device.type)
    finite = bool(deep_knn_filter(x, y, 50).any())
    return [[f"Deep k-NN, n={n:,}, d={d}, k=50 (float32, TF32 off)", "cdist + topk brute force", t_ours, t_brute,
             f"{t_ours / t_brute:.3f}", "yes" if finite else "NO"],
            [f"Deep k-NN achieved rate / matmul rate ({rate:.0f} / {mm:.0f} GFLOP/s)", "target >= 0.7", "-", "-",
             f"{rate / mm:.3f}", "yes"]]


def _sinkhorn_row(device: torch.device) -> list[Any]:
    import ot  # POT

    from lightning_robust.ot import sinkhorn

    g = torch.Generator().manual_seed(0)
    n = _S.ot_n
    xa, xb = torch.rand(n, 2, generator=g).to(device), torch.rand(n, 2, generator=g).to(device)
    cost = torch.cdist(xa, xb) ** 2
    a = torch.full((n,), 1 / n, device=device)
    # Equal accuracy: each run to a marginal error of 1e-6 (ours: its plan-error bound, which is stricter).
    t_ours = _seconds(lambda: sinkhorn(cost, a, a, reg=0.05, tol=1e-6, max_iter=10_000), device)
    t_pot = _seconds(lambda: ot.sinkhorn(a, a, cost, 0.05, method="sinkhorn_log", numItermax=10_000, stopThr=1e-6),
                     device)
    res = sinkhorn(cost, a, a, reg=0.05, tol=1e-6, max_iter=10_000)
    finite = bool(torch.isfinite(res.plan).all())
    return [f"Sinkhorn (log domain), {n}x{n}, reg 0.05, to marginal error 1e-6", "POT sinkhorn_log", t_ours, t_pot,
            f"{t_ours / t_pot:.3f}", "yes" if finite else "NO"]


def _smoothgrad_row(device: torch.device) -> list[Any]:
    from captum.attr import NoiseTunnel, Saliency

    from lightning_robust.interpret import smoothgrad

    torch.manual_seed(0)
    net = _resnet().to(device).eval()
    count, n = (8, 50) if not _S.quick else (2, 4)
    x = torch.rand(count, 3, _S.image, _S.image, device=device)
    target = net(x).argmax(1)
    tunnel = NoiseTunnel(Saliency(net))
    t_ours = _seconds(lambda: smoothgrad(net, x, target, n_samples=n, sigma=0.15), device)
    t_cap = _seconds(lambda: tunnel.attribute(x, nt_type="smoothgrad", nt_samples=n, stdevs=0.15, target=target),
                     device)
    finite = bool(torch.isfinite(smoothgrad(net, x, target, n_samples=n, sigma=0.15)).all())
    return [f"SmoothGrad, {count} images, n={n}, default batching", "captum NoiseTunnel", t_ours, t_cap,
            f"{t_ours / t_cap:.3f}", "yes" if finite else "NO"]


def peer_rows(device: torch.device) -> tuple[list[list[Any]], bool]:
    rows: list[list[Any]] = []
    ok = True
    for name, fn in (("PGD", _pgd_row), ("Deep k-NN", _knn_rows), ("Sinkhorn", _sinkhorn_row),
                     ("SmoothGrad", _smoothgrad_row)):
        try:
            out = fn(device)
            for r in out if isinstance(out[0], list) else [out]:
                rows.append(r)
                ok &= r[-1] == "yes"
        except ImportError as err:
            rows.append([name, f"skipped: {err.name} not installed", "-", "-", "-", "-"])
        except Exception as err:
            traceback.print_exc()
            rows.append([name, f"FAILED: {type(err).__name__}: {str(err)[:80]}", "-", "-", "-", "NO"])
            ok = False
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    global _S
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and steps (CPU smoke run)")
    parser.add_argument("--out", default="gpu-benchmark.md", help="Markdown file to write the table to")
    parser.add_argument("--precision", default=None, help="Trainer precision (default: bf16-mixed on CUDA, 32 on CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the Classifier with a torch.compile-d net (default: on CUDA only)")
    parser.add_argument("--skip-modules", action="store_true", help="only the peer comparisons")
    args = parser.parse_args(argv)
    _S = scale(args.quick)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        # Deep k-NN's exactness bound assumes full float32 products unless told otherwise; keep TF32 off for
        # the rate comparison (the matmul rate is measured the same way).
        torch.backends.cuda.matmul.allow_tf32 = False
    precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    compile_net = cuda if args.compile is None else args.compile
    t0 = time.perf_counter()
    ok = True
    parts = [f"### GPU benchmark ({'quick, ' if args.quick else ''}{torch.cuda.get_device_name(0) if cuda else 'CPU'}, "
             f"precision {precision})\n"]
    if not args.skip_modules:
        rows, ok_m = module_rows(precision, compile_net, device)
        ok &= ok_m
        parts.append(markdown_table(["LightningModule", "batch", "batches/s", "peak GPU MB",
                                     "Trainer overhead (Trainer time / plain loop time)", "finite"], rows))
    rows, ok_p = peer_rows(device)
    ok &= ok_p
    parts.append(markdown_table(["comparison", "peer", "ours (s)", "peer (s)", "ours / peer", "finite"], rows))
    parts.append(f"_{time.perf_counter() - t0:.0f} s on: {machine_info()}._")
    table = "\n\n".join(parts) + "\n"
    print(table)
    Path(args.out).write_text(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
