"""Speed of the interpretation tools, as ratios measured side by side in one run.

* Batched SmoothGrad (``n`` noisy gradients evaluated ``batch_size`` at a time) against ``n`` separate
  single-input gradient computations (target: at most 0.6 of their time).
* Our SmoothGrad against captum's ``NoiseTunnel(Saliency)`` at the same settings (same number of draws,
  same batch size, same model, signed gradients; target: time ratio at most 1.0). The three SmoothGrad
  variants are timed in alternation (median of 15 rounds), so that a busy machine slows them alike.
* The closed-form ReLU input Hessian ``Jᵀ(diag(p) - ppᵀ)J`` against ``torch.autograd.functional.hessian``
  (one input at a time, as that function takes it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, timeit
from lightning_robust.interpret import gradient_saliency, relu_input_hessian, smoothgrad
from lightning_robust.nets import SmallCNN


def _interleaved(fns: list[Callable[[], object]], repeat: int) -> list[float]:
    """Median seconds of each function, timed in alternation so that load changes on a shared machine hit
    all of them alike (sequential medians drift by several percent on a busy 2-core machine)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, out in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _smoothgrad_rows(size: int, n: int, batch_size: int | None, repeat: int, count: int = 1) -> list[list[object]]:
    """``batch_size=None``: each library's default batching (ours: the input-element budget; captum's
    ``NoiseTunnel``: every noisy copy in one pass); otherwise both at that batch."""
    from captum.attr import NoiseTunnel, Saliency

    torch.manual_seed(0)
    net = SmallCNN(input_size=size).eval()
    x = torch.rand(count, 1, size, size)
    target = net(x).argmax(1)
    gen = torch.Generator().manual_seed(0)

    def one_by_one() -> None:
        for _ in range(n):
            gradient_saliency(net, x + 0.15 * torch.randn(x.shape, generator=gen), target)

    def ours() -> None:
        smoothgrad(net, x, target, n_samples=n, sigma=0.15, batch_size=batch_size, generator=gen)

    tunnel = NoiseTunnel(Saliency(net))
    # captum's nt_samples_batch_size counts draws per input; ours counts noisy inputs in all.
    cap_batch = None if batch_size is None else max(1, batch_size // count)

    def captum() -> None:
        tunnel.attribute(x, nt_type="smoothgrad", nt_samples=n, nt_samples_batch_size=cap_batch, stdevs=0.15,
                         target=target, abs=False)

    fns = [ours, captum] if count > 1 else [one_by_one, ours, captum]
    times = _interleaved(fns, repeat=3 * repeat)
    t_loop, t_ours, t_cap = (float("nan"), *times) if count > 1 else times
    batching = "each library's default batching" if batch_size is None else f"both at batch {batch_size}"
    label = f"SmallCNN {size}x{size}, {count} input(s), n={n}, {batching}"
    return [[label, t_loop, t_ours, t_ours / t_loop, t_cap, t_ours / t_cap]]


def _hessian_rows(size: int, count: int, repeat: int) -> list[list[object]]:
    torch.manual_seed(0)
    net = SmallCNN(input_size=size).double().eval()
    x = torch.rand(count, 1, size, size, dtype=torch.float64)
    y = net(x).argmax(1)

    def ours() -> torch.Tensor:
        return relu_input_hessian(net, x, y)

    def autograd() -> torch.Tensor:
        out = []
        for i in range(count):
            def loss(z: torch.Tensor, i: int = i) -> torch.Tensor:
                return F.cross_entropy(net(z.view(1, 1, size, size)), y[i:i + 1])
            out.append(torch.autograd.functional.hessian(loss, x[i].flatten()))
        return torch.stack(out)

    err = float((ours() - autograd()).abs().max())
    t_ours = timeit(ours, repeat=repeat)
    t_auto = timeit(autograd, repeat=max(1, repeat // 2), warmup=0)
    return [[f"SmallCNN {size}x{size} (D={size * size}), {count} inputs, float64", t_auto, t_ours, t_auto / t_ours,
             f"{err:.1e}"]]


def run(quick: bool = False) -> str:
    repeat = 2 if quick else 5
    sg_rows = _smoothgrad_rows(8, 64 if quick else 256, 64 if quick else 256, repeat)
    sg_rows += _smoothgrad_rows(28, 32 if quick else 128, 32 if quick else 128, repeat)
    # A user's first call: a batch of images, every argument at its default (issue 25: the old fixed
    # batch_size=256 made this 6x slower than captum); then the same call with both at one equal batch.
    count, n_default = (4, 16) if quick else (32, 50)
    sg_rows += _smoothgrad_rows(28, n_default, None, repeat, count)
    sg_rows += _smoothgrad_rows(28, n_default, 256, repeat, count)
    h_rows = _hessian_rows(8, 2 if quick else 8, repeat)
    h_rows += _hessian_rows(28, 1 if quick else 2, repeat)
    return (
        "### SmoothGrad: batched noise vs one gradient at a time vs captum NoiseTunnel\n\n"
        "Rows with several inputs skip the one-at-a-time loop (nan). Target for each library's default "
        "batching: ours / captum <= 1.2 (issue 25). Timed in alternation on a 2-core machine shared with "
        "other engineers' jobs.\n\n"
        + markdown_table(["setting", "n single gradients (s)", "ours, batched (s)", "ours / loop (target <= 0.6)",
                          "captum NoiseTunnel (s)", "ours / captum (target <= 1.0)"], sg_rows)
        + "\n\n### Closed-form ReLU input Hessian vs torch.autograd.functional.hessian\n\n"
        + markdown_table(["setting", "autograd.functional.hessian (s)", "relu_input_hessian (s)", "speed-up",
                          "max abs difference"], h_rows)
    )
