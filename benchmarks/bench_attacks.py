"""Speed of our PGD: against k plain forward+backward passes, and against torchattacks' PGD.

* **PGD-k overhead**: time of ``PGD(steps=k)`` divided by the time of ``k`` plain forward + input-gradient
  backward passes of the same net on the same batch (target: at most 1.2; the rest of an attack step is a
  sign, a step and a projection).
* **vs torchattacks**: our ``PGD`` and ``torchattacks.PGD`` at the same ``eps``, ``alpha``, ``steps`` and start
  (no random start, so both run the identical algorithm), timed side by side; the ratio is ours / theirs
  (target: at most 1.0) and both robust accuracies are reported (same strength expected).

Both comparisons run the two sides alternately and report the median of the per-pair time ratios, so that
the load of a shared machine drifting between the two measurements does not bias the ratio. Without a GPU
the times are the process's CPU seconds (not wall-clock), which other processes on a shared machine do not
inflate.

Nets: the digits SmallCNN at 28x28 (trained for a few epochs on the bundled digits, so robust accuracy
means something) and an untrained CIFAR-size ResNet-18 (speed only).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, sync
from lightning_robust.attacks import PGD
from lightning_robust.datamodules import load_digits_tensors
from lightning_robust.nets import ResNet18, SmallCNN


def clock() -> Callable[[], float]:
    """The timer for ratios: this process's CPU time on a CPU-only machine, wall-clock with a GPU.

    On a busy shared CPU, wall-clock time mostly measures the other processes; the process's own CPU time
    is the work done (with one torch thread it equals the time on an idle machine, up to cache effects).
    """
    return time.perf_counter if torch.cuda.is_available() else time.process_time


def paired_times(fa: Callable[[], object], fb: Callable[[], object], repeat: int) -> tuple[float, float, float]:
    """Median times of ``fa`` and ``fb`` run alternately, and the median of the per-pair ratios ``b / a``.

    Alternating the two keeps slow drifts of a shared machine's load out of the ratio; see :func:`clock`.
    """
    now = clock()
    fa()
    fb()
    ta, tb = [], []
    for _ in range(repeat):
        for f, out in ((fa, ta), (fb, tb)):
            sync()
            t0 = now()
            f()
            sync()
            out.append(now() - t0)
    ratios = [b / a for a, b in zip(ta, tb)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def _plain_passes(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> None:
    for _ in range(k):
        xr = x.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(net(xr), y), xr)


def _train_digits_cnn(x: torch.Tensor, y: torch.Tensor, epochs: int) -> SmallCNN:
    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, num_classes=10, input_size=28)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(1400).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def _accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def run(quick: bool = False) -> str:
    import torchattacks

    x, y = load_digits_tensors(28, 1)
    digits_net = _train_digits_cnn(x, y, 1 if quick else 4)
    xt, yt = x[1400:], y[1400:]
    n = 128 if quick else 256
    xb, yb = xt[:n], yt[:n]
    torch.manual_seed(0)
    resnet = ResNet18(num_classes=10).eval()
    xr = torch.rand(8 if quick else 32, 3, 32, 32)
    yr = torch.randint(0, 10, (xr.shape[0],))
    repeat = 2 if quick else 3
    k = 10

    overhead_rows = []
    for name, net, xs, ys in (("SmallCNN 28x28", digits_net, xb, yb), ("ResNet-18 32x32", resnet, xr, yr)):
        attack = PGD(eps=8 / 255, alpha=2 / 255, steps=k, random_start=True)
        t_plain, t_attack, ratio = paired_times(lambda m=net, u=xs, v=ys: _plain_passes(m, u, v, k),  # type: ignore[misc]
                                                lambda a=attack, m=net, u=xs, v=ys: a(m, u, v),  # type: ignore[misc]
                                                repeat)
        overhead_rows.append([name, xs.shape[0], k, t_plain, t_attack, ratio])

    vs_rows = []
    for eps, steps in ((0.1, 10), (0.2, 20)):
        ours = PGD(eps=eps, alpha=eps / 4, steps=steps, random_start=False)
        theirs = torchattacks.PGD(digits_net, eps=eps, alpha=eps / 4, steps=steps, random_start=False)
        t_theirs, t_ours, ratio = paired_times(lambda a=theirs: a(xb, yb),  # type: ignore[misc]
                                               lambda a=ours: a(digits_net, xb, yb), repeat)  # type: ignore[misc]
        acc_ours = _accuracy(digits_net, ours(digits_net, xb, yb), yb)
        acc_theirs = _accuracy(digits_net, theirs(xb, yb), yb)
        vs_rows.append([f"eps={eps}, alpha={eps / 4:.3g}, steps={steps}", t_ours, t_theirs, ratio,
                        acc_ours, acc_theirs])
    clean = _accuracy(digits_net, xb, yb)
    unit = "s" if torch.cuda.is_available() else "CPU s"
    return (
        f"### PGD-{k} time over {k} forward+backward passes (L-inf, eps 8/255, random start)\n\n"
        + markdown_table(["net", "batch", "k", f"k plain passes ({unit})", f"PGD-k ({unit})", "ratio (target <= 1.2)"],
                         overhead_rows)
        + f"\n\n### Our PGD vs torchattacks.PGD (digits SmallCNN 28x28, {n} held-out digits, clean accuracy "
        f"{clean:.3f}, no random start)\n\n"
        + markdown_table(["setting", f"ours ({unit})", f"torchattacks ({unit})", "time ratio (target <= 1.0)",
                          "robust acc ours", "robust acc torchattacks"], vs_rows)
    )
