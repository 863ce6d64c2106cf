"""Gradient saliency, SmoothGrad, sparsified SmoothGrad and its robustness certificate.

Levine, Singla & Feizi, "Certifiably Robust Interpretation in Deep Learning" (arXiv 1905.12105).

* **SmoothGrad** (Smilkov et al. 2017): ``ḡ(x) = E_ε[g(x + ε)]``, ``ε ~ N(0, σ² I)``, where ``g`` is the input
  gradient of the target logit, estimated from ``n`` noise samples.
* **Scaled SmoothGrad**: each sample map is ``|g| / max|g|`` (values in [0, 1]) before averaging.
* **Sparsified SmoothGrad**: each sample map is the indicator of the top ``⌊τ d⌋`` entries of ``|g|``
  (1 there, 0 elsewhere) before averaging, so every pixel's value is the fraction of noise draws that put it
  in the top-τ set.
* **Certificate**: for a map ``h`` with values in [0, 1], ``Φ⁻¹(E h(x + ε))`` is ``1/σ``-Lipschitz in ``x``
  (Salman et al. 2019), so each smoothed pixel ``v_i`` stays in ``[Φ(Φ⁻¹(v_i) - r/σ), Φ(Φ⁻¹(v_i) + r/σ)]``
  under any L2 perturbation of size ``r``. With the values sorted (``v_(1) >= v_(2) >= ...``), ``q`` pixels of
  the top-k can be displaced only if the ``q``-th weakest insider can fall below the ``q``-th strongest
  outsider: ``lower(v_(k-q+1)) <= upper(v_(k+q))``. The certificate is ``k - (largest such q)``, computed
  from Monte-Carlo estimates widened by the Hoeffding error ``sqrt(ln(2d / (1 - η)) / (2n))`` so that it
  holds with probability at least ``η`` over the sampling.

All functions are pure PyTorch, work under ``torch.no_grad()`` / ``inference_mode()`` (validation loops),
leave the model's train/eval mode and parameters' ``.grad`` untouched, and bound their memory by evaluating
at most ``batch_size`` noisy inputs at a time (by default as many as fit a fixed input-element budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_robust.utils.validation import check_finite, check_fraction, check_positive, check_positive_int

__all__ = [
    "AUTO_BATCH_ELEMENTS",
    "auto_batch_size",
    "certified_topk_intersection",
    "gradient_saliency",
    "hoeffding_error",
    "scale_saliency",
    "scaled_smoothgrad",
    "smoothgrad",
    "sparsified_smoothgrad",
    "sparsify_saliency",
    "topk_intersection",
    "topk_mask",
]

Target = int | torch.Tensor | None
Transform = Callable[[torch.Tensor], torch.Tensor]


def _check_input(x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch [B, ...], got shape {tuple(x.shape)}")


def _resolve_target(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """Per-sample class indices: the given ones, or the model's prediction at ``x``."""
    if target is None:
        with torch.no_grad():
            return model(x).argmax(1)
    if isinstance(target, int) and not isinstance(target, bool):
        return torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
    if not torch.is_tensor(target) or target.is_floating_point() or target.ndim != 1 or target.shape[0] != x.shape[0]:
        raise ValueError(f"target must be None, an int or an integer tensor of shape [{x.shape[0]}], got "
                         + (f"shape {tuple(target.shape)}" if torch.is_tensor(target) else repr(target)))
    return target.to(device=x.device, dtype=torch.long)


def _target_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor, create_graph: bool) -> torch.Tensor:
    logits = model(x)
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= logits.shape[1]):
        raise ValueError(f"target must hold class indices in [0, {logits.shape[1] - 1}], "
                         f"got values in [{int(target.min())}, {int(target.max())}]")
    selected = logits.gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(selected, x, create_graph=create_graph)
    return grad


def gradient_saliency(model: nn.Module, x: torch.Tensor, target: Target = None, *, absolute: bool = False,
                      create_graph: bool = False) -> torch.Tensor:
    """Input gradient of the target logit, ``∂ z_t(x) / ∂x`` (Simonyan et al. 2014), the basic saliency map.

    Args:
        model: maps ``x`` to logits ``[B, C]``.
        x: inputs ``[B, ...]``.
        target: class per sample (int or ``[B]`` tensor); ``None`` explains the predicted class.
        absolute: return ``|∂ z_t / ∂x|`` (the paper's saliency map) instead of the signed gradient.
        create_graph: keep the graph so the map can be differentiated again (double backpropagation,
            used by interpretation-regularized training); the map then depends on the model's parameters.

    Returns:
        A tensor shaped like ``x``.

    Example:
        >>> g = gradient_saliency(net, x)            # signed gradient of the predicted logit
    """
    check_finite("x", x)
    _check_input(x)
    with torch.inference_mode(False), torch.enable_grad():
        x0 = x.detach().clone().requires_grad_(True)
        t = _resolve_target(model, x0, target)
        grad = _target_gradient(model, x0, t, create_graph)
    if not create_graph:
        grad = grad.detach()
    return grad.abs() if absolute else grad


def scale_saliency(grad: torch.Tensor) -> torch.Tensor:
    """``|g| / max|g|`` per sample (values in [0, 1]; an all-zero map stays zero): "scaled" saliency."""
    check_finite("grad", grad)
    a = grad.abs().flatten(1)
    return (a / a.amax(1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)).view_as(grad)


def _sparse_count(d: int, tau: float) -> int:
    return max(1, int(tau * d))


def sparsify_saliency(grad: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """The paper's sparsification: 1 on the top ``max(1, ⌊τ d⌋)`` entries of ``|g|`` per sample, 0 elsewhere.

    Raises:
        ValueError: if ``tau`` is not in (0, 1].
    """
    check_finite("grad", grad)
    check_fraction("tau", tau, inclusive_low=False, inclusive_high=True)
    a = grad.abs().flatten(1)
    k = _sparse_count(a.shape[1], tau)
    out = torch.zeros_like(a)
    out.scatter_(1, a.topk(k, dim=1).indices, 1.0)
    return out.view_as(grad)


#: Input elements per forward pass when ``batch_size`` is left to the functions: 2^20 (4 MB of float32
#: input) is 341 CIFAR-10 images, 1337 MNIST digits or 16384 8x8 digits at once, and 6 ImageNet images.
#: A fixed count (the old default, 256) made a first call on small images 6x slower than captum's
#: ``NoiseTunnel`` (which evaluates every noisy copy in one pass); an element budget keeps the per-call
#: overhead small on small inputs while bounding memory on large ones.
AUTO_BATCH_ELEMENTS = 1 << 20


def auto_batch_size(x: torch.Tensor, n_samples: int, elements: int = AUTO_BATCH_ELEMENTS) -> int:
    """Noisy copies per forward pass: as many as fit ``elements`` input elements, at most ``B * n_samples``."""
    per_input = max(1, x[0].numel())
    return max(1, min(x.shape[0] * n_samples, elements // per_input))


def _smoothed(model: nn.Module, x: torch.Tensor, target: Target, n_samples: int, sigma: float,
              batch_size: int | None,
              generator: torch.Generator | None, transform: Transform | None) -> torch.Tensor:
    """Mean of ``transform(∂ z_t / ∂x)`` over ``n_samples`` Gaussian perturbations of each input.

    The ``B * n_samples`` noisy inputs are evaluated ``batch_size`` at a time, in sample-major order per
    image, so memory is bounded by ``batch_size`` whatever ``B`` and ``n_samples`` are.
    """
    _check_input(x)
    check_positive_int("n_samples", n_samples)
    check_positive("sigma", sigma)
    batch_size = auto_batch_size(x, n_samples) if batch_size is None else check_positive_int("batch_size", batch_size)
    noise_device = generator.device if generator is not None else x.device
    with torch.inference_mode(False), torch.enable_grad():
        x0 = x.detach().clone()
        t = _resolve_target(model, x0, target)
        total = x0.shape[0] * n_samples
        acc = torch.zeros_like(x0)
        for start in range(0, total, batch_size):
            owner = torch.arange(start, min(start + batch_size, total), device=x0.device) // n_samples
            noise = torch.randn((owner.shape[0], *x0.shape[1:]), generator=generator, device=noise_device,
                                dtype=x0.dtype).to(x0.device)
            xs = x0.index_select(0, owner).add_(noise, alpha=sigma).requires_grad_(True)
            g = _target_gradient(model, xs, t.index_select(0, owner), create_graph=False)
            acc.index_add_(0, owner, transform(g) if transform is not None else g)
    return acc.div_(n_samples)


def smoothgrad(model: nn.Module, x: torch.Tensor, target: Target = None, n_samples: int = 50, sigma: float = 0.15,
               batch_size: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """SmoothGrad: the mean signed input gradient of the target logit under Gaussian noise.

    ``ḡ(x) = (1/n) Σ_j ∂ z_t(x + ε_j) / ∂x`` with ``ε_j ~ N(0, σ² I)`` (Smilkov et al. 2017, arXiv 1706.03825;
    the smoothing studied by Levine et al., arXiv 1905.12105). Same estimator as captum's
    ``NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", stdevs=σ, abs=False)``.

    Args:
        model: maps inputs to logits.
        x: inputs ``[B, ...]`` (noisy copies are not clipped to the image range, as in the paper).
        target: class per sample; ``None`` explains the prediction at ``x``.
        n_samples: noise draws per input (>= 1).
        sigma: noise standard deviation, in input units (> 0).
        batch_size: most noisy inputs evaluated at once (bounds memory); ``None`` (default) takes as many
            as fit :data:`AUTO_BATCH_ELEMENTS` input elements (:func:`auto_batch_size`).
        generator: optional ``torch.Generator`` for the noise (reproducible maps).

    Raises:
        ValueError: ``n_samples < 1``, ``sigma <= 0``, ``batch_size < 1`` or a malformed target.

    Example:
        >>> g = smoothgrad(net, x, n_samples=100, sigma=0.15, generator=torch.Generator().manual_seed(0))
    """
    check_finite("x", x)
    return _smoothed(model, x, target, n_samples, sigma, batch_size, generator, None)


def scaled_smoothgrad(model: nn.Module, x: torch.Tensor, target: Target = None, n_samples: int = 50,
                      sigma: float = 0.15, batch_size: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled SmoothGrad, the paper's baseline: the mean of ``|g| / max|g|`` over noise draws (values in [0, 1]).

    Arguments as in :func:`smoothgrad`. Its values lie in [0, 1], so :func:`certified_topk_intersection`
    applies to it as well.
    """
    check_finite("x", x)
    return _smoothed(model, x, target, n_samples, sigma, batch_size, generator, scale_saliency)


def sparsified_smoothgrad(model: nn.Module, x: torch.Tensor, target: Target = None, n_samples: int = 50,
                          sigma: float = 0.15, tau: float = 0.1, batch_size: int | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Sparsified SmoothGrad (Levine et al., arXiv 1905.12105): the mean over noise draws of top-τ indicators.

    Each noisy gradient is sparsified by :func:`sparsify_saliency` (1 on its top ``⌊τ d⌋`` entries by
    magnitude, 0 elsewhere) before averaging, so the map's value at a pixel is the probability, under the
    noise, that the pixel ranks in the top-τ fraction. Values lie in [0, 1]; :func:`certified_topk_intersection`
    turns them into a robustness certificate.

    Args:
        tau: the sparsification parameter, the fraction of entries set to 1 in each sample, in (0, 1]
            (the paper sweeps 0.02 to 0.5).
        Others: as in :func:`smoothgrad`.

    Raises:
        ValueError: ``n_samples < 1``, ``sigma <= 0``, ``tau`` outside (0, 1], ``batch_size < 1``.

    Example:
        >>> s = sparsified_smoothgrad(net, x, n_samples=1024, sigma=0.25, tau=0.1)
        >>> certified_topk_intersection(s, k=13, radius=0.1, sigma=0.25, n_samples=1024)
    """
    check_finite("x", x)
    check_fraction("tau", tau, inclusive_low=False, inclusive_high=True)
    return _smoothed(model, x, target, n_samples, sigma, batch_size, generator,
                     lambda g: sparsify_saliency(g, tau))


def _check_k(k: int, d: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= d:
        raise ValueError(f"k must be an integer in (0, {d}] (the number of entries per map), got {k!r}")
    return k


def topk_mask(saliency: torch.Tensor, k: int, absolute: bool = True) -> torch.Tensor:
    """Boolean ``[B, d]`` mask of the ``k`` largest entries of each flattened map (by magnitude by default).

    Raises:
        ValueError: if ``k`` is not in (0, d].
    """
    check_finite("saliency", saliency)
    flat = saliency.flatten(1)
    flat = flat.abs() if absolute else flat
    _check_k(k, flat.shape[1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    return mask.scatter_(1, flat.topk(k, dim=1).indices, True)


def topk_intersection(a: torch.Tensor, b: torch.Tensor, k: int, absolute: bool = True) -> torch.Tensor:
    """Per-sample size of the intersection of the top-k entries of ``a`` and ``b`` (a ``[B]`` long tensor).

    The paper's robustness measure of an interpretation: divide by ``k`` for the top-k overlap fraction.

    Raises:
        ValueError: on different shapes or ``k`` outside (0, d].
    """
    check_finite("a", a)
    check_finite("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (topk_mask(a, k, absolute) & topk_mask(b, k, absolute)).sum(1)


def hoeffding_error(d: int, n_samples: int, confidence: float = 0.95) -> float:
    """Half-width ``sqrt(ln(2d / (1 - η)) / (2n))`` of simultaneous Hoeffding intervals for ``d`` means.

    With probability at least ``η = confidence``, every one of ``d`` averages of ``n`` i.i.d. [0, 1] values
    lies within this distance of its expectation (two-sided Hoeffding bound with a union bound).
    """
    check_positive_int("d", d)
    check_positive_int("n_samples", n_samples)
    check_fraction("confidence", confidence, inclusive_low=True, inclusive_high=False)
    return math.sqrt(math.log(2 * d / (1 - confidence)) / (2 * n_samples))


def certified_topk_intersection(saliency: torch.Tensor, k: int, radius: float | Sequence[float], sigma: float,
                                n_samples: int | None, confidence: float = 0.95) -> torch.Tensor:
    """Certified lower bound on the top-k overlap of a smoothed [0, 1]-valued map under L2 perturbations.

    For each sample, returns the largest ``m`` such that (with probability at least ``confidence`` over the
    Monte-Carlo estimate) the top-k entries of the smoothed map at ``x`` and at every ``x'`` with
    ``||x' - x||_2 <= radius`` share at least ``m`` entries (Levine et al., arXiv 1905.12105, with the
    Hoeffding sampling correction of their code). With ``v`` the sorted estimates, ``e`` the Hoeffding
    half-width and ``s = radius / sigma``, ``q`` displacements are ruled out when
    ``Φ(Φ⁻¹(v_(k-q+1) - e) - s) > Φ(Φ⁻¹(v_(k+q) + e) + s)``; the certificate is ``k + 1 - (smallest such q)``.

    Args:
        saliency: smoothed maps ``[B, ...]`` with values in [0, 1] (:func:`sparsified_smoothgrad` or
            :func:`scaled_smoothgrad` outputs); ranked by value.
        k: size of the top set, in (0, d].
        radius: L2 radius (>= 0), or a sequence of radii.
        sigma: the smoothing noise's standard deviation used to compute ``saliency``.
        n_samples: number of noise draws behind ``saliency`` (sets the Hoeffding error); ``None`` treats the
            values as exact expectations (no sampling correction).
        confidence: probability ``η`` that the sampling correction holds, in [0, 1).

    Returns:
        A long tensor ``[B]`` (one radius) or ``[B, R]`` (a sequence of ``R`` radii) of certified counts in
        ``[0, k]``.

    Raises:
        ValueError: ``k`` outside (0, d], ``sigma <= 0``, a negative radius, ``n_samples < 1``, or values
            outside [0, 1].

    Example:
        >>> s = sparsified_smoothgrad(net, x, n_samples=2048, sigma=0.2, tau=0.1)
        >>> certified_topk_intersection(s, k=16, radius=[0.05, 0.1], sigma=0.2, n_samples=2048) / 16
    """
    check_finite("saliency", saliency)
    check_positive("sigma", sigma)
    radii = [radius] if isinstance(radius, (int, float)) else list(radius)
    for r in radii:
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r) or r < 0:
            raise ValueError(f"radius must be a non-negative number or a sequence of them, got {radius!r}")
    flat = saliency.detach().flatten(1).double()
    d = flat.shape[1]
    _check_k(k, d)
    if flat.numel() and (float(flat.min()) < -1e-9 or float(flat.max()) > 1 + 1e-9):
        raise ValueError("saliency values must lie in [0, 1] (use sparsified_smoothgrad or scaled_smoothgrad), "
                         f"got values in [{float(flat.min()):.4g}, {float(flat.max()):.4g}]")
    err = 0.0 if n_samples is None else hoeffding_error(d, n_samples, confidence)
    v = flat.clamp(0, 1).sort(dim=1, descending=True).values
    q = torch.arange(1, k + 1, device=v.device)
    insider = v[:, k - q]                                   # v_(k-q+1), 0-based index k-q
    out_idx = k + q - 1                                     # v_(k+q), 0-based index k+q-1
    exists = out_idx < d
    outsider = v[:, out_idx.clamp(max=d - 1)]
    lo = torch.special.ndtri((insider - err).clamp(0, 1))   # -inf when the lower confidence bound is 0
    hi = torch.special.ndtri((outsider + err).clamp(0, 1))  # +inf when the upper confidence bound is 1
    results = []
    for r in radii:
        shift = 2.0 * float(r) / sigma
        # Displacing q insiders needs q outsiders to overtake; impossible when none exist (k + q > d).
        safe = (lo - shift > hi) | ~exists
        # safe is monotone in q (insider grows, outsider shrinks with q): count the safe q's.
        results.append(safe.sum(1))
    out = torch.stack(results, 1) if not isinstance(radius, (int, float)) else results[0]
    return out.to(device=saliency.device, dtype=torch.long)
