"""An L2 attack on the saliency map that keeps the prediction: the top-k attack of Ghorbani et al.

Ghorbani, Abid & Zou (2019, arXiv 1710.10547) move the input so that the pixels that were most salient
lose their share of the saliency map while the predicted class stays the same. Levine, Singla & Feizi
(arXiv 1905.12105, Appendix D) use an L2 version of it both to evaluate interpretation robustness and
inside interpretation-regularized adversarial training; this is that attack.

:class:`RandomSearchSaliencyAttack` pursues the same objective without any gradient of it: a defence
trained against the gradient attack cannot mask what a random search finds (Athalye et al., arXiv
1802.00420, on gradient masking), so it is the independent check on interpretation-regularized training.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lightning_robust.attacks.base import Attack
from lightning_robust.attacks.threat import ThreatModel
from lightning_robust.interpret.saliency import topk_mask
from lightning_robust.interpret.softplus import softplus_surrogate
from lightning_robust.utils.validation import (
    check_choice,
    check_finite,
    check_fraction,
    check_positive,
    check_positive_int,
)

__all__ = ["RandomSearchSaliencyAttack", "TopKSaliencyAttack", "topk_saliency_mass"]


def topk_saliency_mass(saliency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of ``|saliency|`` (per sample, L1-normalized) that falls on ``mask`` ([B, d] bool): in [0, 1]."""
    check_finite("saliency", saliency)
    a = saliency.abs().flatten(1)
    return (a * mask).sum(1) / a.sum(1).clamp_min(torch.finfo(a.dtype).tiny)


class TopKSaliencyAttack(Attack):
    """Minimize the saliency mass on the original top-k pixels within an L2 ball, keeping the prediction.

    The saliency map is the input gradient of the predicted class's logit. For each restart the attack
    draws random points on the sphere of radius ``eps`` (clipped to the image box) until one keeps the
    prediction (at most ``search_steps`` draws), then takes ``steps`` normalized gradient steps on
    ``Σ_{i ∈ top-k(x)} |g_i(x')| / Σ_i |g_i(x')|``: the first step has length ``eps``, each step is projected on
    the ball, halved up to ``backtracks`` times while the prediction would change (then the sample stays),
    and the step size decays as ``(i + 1)/(i + 2)``. Per sample it returns the visited point with the lowest
    top-k mass that kept the prediction (``x`` itself where no such point was found). This follows the
    authors' ``EnhancedGhorbaniBatchL2Attacker``.

    ReLU networks have zero input curvature almost everywhere, so the objective's gradient vanishes; with
    ``softplus_beta`` set, gradients are taken through a softplus twin of the network with the same
    weights (:func:`~lightning_robust.interpret.softplus_surrogate`), while predictions and the objective
    used to pick the best point come from the network itself.

    ``y`` is only validated: the attacked map and the preserved prediction are those of the model at ``x``.

    Args:
        eps: L2 radius in pixel units (> 0).
        k: number of top pixels attacked; default ``max(1, ⌊k_fraction · d⌋)``.
        k_fraction: used when ``k`` is None (the paper: 0.25).
        steps: gradient steps per restart (paper: 15 for training).
        restarts: independent random starts (paper: 3).
        search_steps: random draws allowed to find a start that keeps the prediction (paper: 100).
        backtracks: step halvings before a sample gives up a step (paper: 10).
        softplus_beta: take gradients through ``softplus(beta)`` in place of ReLU (``None``: the model as is).
        model_mode, low, high: as in :class:`~lightning_robust.attacks.Attack` / ``ThreatModel``.

    Raises:
        ValueError: on a non-positive eps or beta, zero steps/restarts/search steps, or a fraction outside (0, 1].

    Example:
        >>> attack = TopKSaliencyAttack(eps=1.0, steps=15, restarts=3, softplus_beta=10.0)
        >>> x_adv = attack(net, x, y)
    """

    def __init__(
        self,
        eps: float = 1.0,
        k: int | None = None,
        k_fraction: float = 0.25,
        steps: int = 15,
        restarts: int = 3,
        search_steps: int = 100,
        backtracks: int = 10,
        softplus_beta: float | None = 10.0,
        model_mode: str = "eval",
        low: float = 0.0,
        high: float = 1.0,
    ) -> None:
        check_positive("eps", eps)
        if k is not None:
            check_positive_int("k", k)
        check_fraction("k_fraction", k_fraction, inclusive_low=False, inclusive_high=True)
        check_positive_int("steps", steps)
        check_positive_int("restarts", restarts)
        check_positive_int("search_steps", search_steps)
        if not isinstance(backtracks, int) or isinstance(backtracks, bool) or backtracks < 0:
            raise ValueError(f"backtracks must be a non-negative integer, got {backtracks!r}")
        if softplus_beta is not None:
            check_positive("softplus_beta", softplus_beta)
        super().__init__(ThreatModel("l2", eps, low, high), loss="ce", targeted=False, model_mode=model_mode)
        self.k = k
        self.k_fraction = float(k_fraction)
        self.steps = steps
        self.restarts = restarts
        self.search_steps = search_steps
        self.backtracks = backtracks
        self.softplus_beta = None if softplus_beta is None else float(softplus_beta)

    def num_top(self, d: int) -> int:
        """The ``k`` used for inputs with ``d`` features."""
        k = self.k if self.k is not None else max(1, int(self.k_fraction * d))
        if k > d:
            raise ValueError(f"k must be at most the number of input features {d}, got {k}")
        return k

    def _saliency(self, model: nn.Module, x: torch.Tensor, cls: torch.Tensor, create_graph: bool,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xr).gather(1, cls[:, None]).sum(), xr, create_graph=create_graph)
        return xr, g

    def _score(self, model: nn.Module, x: torch.Tensor, cls: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return topk_saliency_mass(self._saliency(model, x, cls, False)[1], mask).detach()

    def _objective_grad(self, model: nn.Module, x: torch.Tensor, cls: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
        surrogate = (softplus_surrogate(model, self.softplus_beta) if self.softplus_beta is not None
                     else contextlib.nullcontext())
        with surrogate:
            xr, g = self._saliency(model, x, cls, True)
            (grad,) = torch.autograd.grad(topk_saliency_mass(g, mask).sum(), xr, allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad

    def _keeps(self, model: nn.Module, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x).argmax(1) == cls

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        B = x.shape[0]
        view = (-1, *([1] * (x.ndim - 1)))
        tiny = torch.finfo(x.dtype).tiny
        with torch.no_grad():
            cls = model(x).argmax(1)
        mask = topk_mask(self._saliency(model, x, cls, False)[1], self.num_top(x[0].numel()))
        best = x.clone()
        best_score = torch.full((B,), float("inf"), device=x.device, dtype=x.dtype)
        noise_device = generator.device if generator is not None else x.device

        def consider(cand: torch.Tensor, valid: torch.Tensor) -> None:
            score = self._score(model, cand, cls, mask)
            better = valid & (score < best_score)
            best[better] = cand[better]
            best_score[better] = score[better]

        for _ in range(self.restarts):
            cur = x.clone()
            found = torch.zeros(B, dtype=torch.bool, device=x.device)
            for _ in range(self.search_steps):
                d = torch.randn(x.shape, generator=generator, device=noise_device, dtype=x.dtype).to(x.device)
                d = d * (self.eps / d.flatten(1).norm(dim=1).clamp_min(tiny)).view(view)
                cand = self.threat.project(x + d, x)
                ok = self._keeps(model, cand, cls) & ~found
                cur[ok] = cand[ok]
                found |= ok
                if bool(found.all()):
                    break
            if not bool(found.any()):
                continue
            step: torch.Tensor | None = None
            for i in range(self.steps):
                consider(cur, found)
                grad = self._objective_grad(model, cur, cls, mask)
                if step is None:
                    step = self.eps / grad.flatten(1).norm(dim=1).clamp_min(tiny)
                new = self.threat.project(cur - step.view(view) * grad, x)
                ok = self._keeps(model, new, cls)
                for _ in range(self.backtracks):
                    if bool(ok.all()):
                        break
                    step = torch.where(ok, step, step / 2)
                    retry = self.threat.project(cur - step.view(view) * grad, x)
                    new = torch.where(ok.view(view), new, retry)
                    ok = self._keeps(model, new, cls)
                # A sample that still changes class stays where it is and stops moving (as in the paper).
                new = torch.where(ok.view(view), new, cur)
                step = torch.where(ok, step, torch.zeros_like(step)) * (i + 1) / (i + 2)
                cur = new
            consider(cur, found)
        return best


class RandomSearchSaliencyAttack(Attack):
    """Gradient-free top-k saliency attack: the best of ``draws`` random points on the L2 sphere.

    Each draw is a Gaussian direction scaled to length ``eps`` (``radius="sphere"``) or to a length
    ``eps · U^{1/d}`` (``radius="ball"``: uniform in the ball), added to ``x`` and clipped to the image box.
    Among the draws that keep the predicted class, the one with the smallest saliency mass on the original
    top-k pixels (:func:`topk_saliency_mass` of the plain input gradient of the predicted logit) is
    returned, where it beats ``x`` itself; so ``mass(x_adv) <= mass(x)`` always, and with one ``generator``
    seed more draws never do worse (the first draws are the same). It takes no gradient of the objective,
    hence no softplus surrogate and nothing for gradient masking to hide.

    Args:
        eps: L2 radius in pixel units (> 0).
        k: number of top pixels attacked; default ``max(1, ⌊k_fraction · d⌋)``.
        k_fraction: used when ``k`` is None (the paper: 0.25).
        draws: random points per sample (> 0).
        radius: ``"sphere"`` (all draws at distance ``eps`` before clipping) or ``"ball"``.
        batch_draws: draws evaluated per forward/backward pass, for memory.
        model_mode, low, high: as in :class:`~lightning_robust.attacks.Attack` / ``ThreatModel``.

    Raises:
        ValueError: on a non-positive eps, zero draws, an unknown radius or a fraction outside (0, 1].

    Example:
        >>> attack = RandomSearchSaliencyAttack(eps=1.0, draws=300)
        >>> x_adv = attack(net, x, y, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, eps: float = 1.0, k: int | None = None, k_fraction: float = 0.25, draws: int = 300,
                 radius: str = "sphere", batch_draws: int = 16, model_mode: str = "eval", low: float = 0.0,
                 high: float = 1.0) -> None:
        check_positive("eps", eps)
        if k is not None:
            check_positive_int("k", k)
        check_fraction("k_fraction", k_fraction, inclusive_low=False, inclusive_high=True)
        check_positive_int("draws", draws)
        check_positive_int("batch_draws", batch_draws)
        check_choice("radius", radius, ("sphere", "ball"))
        super().__init__(ThreatModel("l2", eps, low, high), loss="ce", targeted=False, model_mode=model_mode)
        self.k = k
        self.k_fraction = float(k_fraction)
        self.draws = draws
        self.radius = radius
        self.batch_draws = batch_draws

    def num_top(self, d: int) -> int:
        """The ``k`` used for inputs with ``d`` features."""
        k = self.k if self.k is not None else max(1, int(self.k_fraction * d))
        if k > d:
            raise ValueError(f"k must be at most the number of input features {d}, got {k}")
        return k

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        B, d = x.shape[0], x[0].numel()
        tiny = torch.finfo(x.dtype).tiny
        noise_device = generator.device if generator is not None else x.device

        def saliency_and_pred(z: torch.Tensor, cls: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            zr = z.detach().requires_grad_(True)
            logits = model(zr)
            pred = logits.argmax(1)
            target = pred if cls is None else cls.repeat(z.shape[0] // cls.shape[0])
            (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), zr)
            return g.detach(), pred.detach()

        g0, cls = saliency_and_pred(x, None)
        mask = topk_mask(g0, self.num_top(d))
        best = x.clone()
        best_score = topk_saliency_mass(g0, mask)
        done = 0
        while done < self.draws:
            n = min(self.batch_draws, self.draws - done)
            u = torch.randn((n, *x.shape), generator=generator, device=noise_device, dtype=x.dtype).to(x.device)
            u = u / u.flatten(2).norm(dim=2).clamp_min(tiny).view(n, B, *([1] * (x.ndim - 1)))
            if self.radius == "ball":
                r = torch.rand((n, B), generator=generator, device=noise_device, dtype=x.dtype).to(x.device)
                u = u * r.pow(1.0 / d).view(n, B, *([1] * (x.ndim - 1)))
            xs = x.repeat(n, *([1] * (x.ndim - 1)))  # draw-major: row j * B + b is draw j of sample b
            cand = self.threat.project(xs + self.eps * u.reshape(n * B, *x.shape[1:]), xs)
            g, pred = saliency_and_pred(cand, cls)
            score = topk_saliency_mass(g, mask.repeat(n, 1)).view(n, B)
            keep = (pred == cls.repeat(n)).view(n, B)
            score = torch.where(keep, score, torch.full_like(score, float("inf")))
            low, idx = score.min(0)
            better = low < best_score
            chosen = cand.view(n, B, *x.shape[1:])[idx, torch.arange(B, device=x.device)]
            best[better] = chosen[better]
            best_score = torch.where(better, low, best_score)
            done += n
        return best
