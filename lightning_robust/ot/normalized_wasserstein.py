"""Normalized Wasserstein (NW) distance for mixture distributions (Balaji, Chellappa & Feizi, arXiv 1902.00415).

A mixture ``P_{G,π} = Σ_k π_k P_{G_k}`` has components ``G_k`` and proportions ``π`` on the simplex. The
Wasserstein distance between two mixtures with the *same* components but different proportions is large,
because mass must move between components. The paper's Normalized Wasserstein makes the proportions
optimisation variables over one shared set of components::

    W_N(P_X, P_Y) = min_{G, π⁽¹⁾, π⁽²⁾}  W(P_X, P_{G,π⁽¹⁾}) + W(P_Y, P_{G,π⁽²⁾})

In adversarial learning each term is estimated in the Kantorovich dual with a 1-Lipschitz critic ``D``::

    W(P_X, P_{G,π}) = max_D  E_{x~P_X}[D(x)] - Σ_k π_k E_{z}[D(G_k(z))]

and ``π = softmax(θ)`` is learned with the components (NW-GAN) or on its own (domain adaptation, where the
components are the source classes). This module holds that dual as a pure function
(:func:`normalized_wasserstein`), the proportions as a module (:class:`MixtureProportions`), a sampler for
the π-mixture (for the gradient penalty), an adversarial estimator usable on any data
(:func:`estimate_normalized_wasserstein`), and a primal, entropic solver
(:func:`normalized_wasserstein_sinkhorn`) that optimises ``π`` exactly for components given as samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lightning_robust.utils.modules import model_mode
from lightning_robust.utils.validation import (
    check_finite,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_probability_vector,
)

__all__ = [
    "MixtureProportions",
    "NWEstimate",
    "NWSinkhornResult",
    "class_mixture_weights",
    "estimate_normalized_wasserstein",
    "mixture_expectation",
    "normalized_wasserstein",
    "normalized_wasserstein_sinkhorn",
    "sample_mixture",
]

ComponentScores = torch.Tensor | Sequence[torch.Tensor]


class MixtureProportions(nn.Module):
    """Mixture proportions ``π = softmax(θ)`` over ``K`` components: NW's optimisation variable.

    The softmax keeps ``π`` on the simplex whatever the optimiser does to the logits ``θ``. With
    ``learnable=False`` the logits are a buffer (the fixed-π baselines of the paper).

    Args:
        num_components: ``K >= 1``.
        init: initial (or fixed) proportions, ``K`` non-negative numbers summing to one; uniform if ``None``.
            A zero proportion becomes a logit of ``log(1e-12)``, so it can still grow when learned.
        learnable: learn ``θ`` (an ``nn.Parameter``) or keep it fixed (a buffer).

    Raises:
        ValueError: if ``K < 1`` or ``init`` is not a probability vector of length ``K``.

    Example:
        >>> pi = MixtureProportions(3)
        >>> pi()
        tensor([0.3333, 0.3333, 0.3333], grad_fn=<SoftmaxBackward0>)
    """

    logits: torch.Tensor

    def __init__(self, num_components: int, init: Sequence[float] | torch.Tensor | None = None,
                 learnable: bool = True) -> None:
        super().__init__()
        check_positive_int("num_components", num_components)
        if init is None:
            p = torch.full((num_components,), 1.0 / num_components, dtype=torch.float64)
        else:
            p = check_probability_vector("proportions", init)
            if p.numel() != num_components:
                raise ValueError(f"proportions must have num_components = {num_components} entries, got {p.numel()}")
        logits = p.clamp_min(1e-12).log().float()
        logits = logits - logits.mean()
        self.learnable = bool(learnable)
        if self.learnable:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    @property
    def num_components(self) -> int:
        return int(self.logits.numel())

    def forward(self) -> torch.Tensor:
        """``π = softmax(θ)``, differentiable w.r.t. ``θ``."""
        return F.softmax(self.logits, dim=0)

    @property
    def proportions(self) -> torch.Tensor:
        """The current ``π`` (detached)."""
        return F.softmax(self.logits.detach(), dim=0)

    def extra_repr(self) -> str:
        return f"num_components={self.num_components}, learnable={self.learnable}"


def _check_proportions_shape(proportions: torch.Tensor, k: int | None = None) -> int:
    if not torch.is_tensor(proportions) or proportions.ndim != 1 or proportions.numel() == 0:
        shape = tuple(proportions.shape) if torch.is_tensor(proportions) else type(proportions).__name__
        raise ValueError(f"proportions must be a non-empty 1-D tensor, got {shape}")
    if k is not None and proportions.numel() != k:
        raise ValueError(f"proportions has {proportions.numel()} entries but there are {k} components")
    return int(proportions.numel())


def class_mixture_weights(labels: torch.Tensor, proportions: torch.Tensor) -> torch.Tensor:
    """Per-sample weights that turn a labelled batch into the π-mixture of its class-conditionals.

    Sample ``i`` of class ``k`` gets ``w_i = π_k / n_k`` (``n_k`` = samples of class ``k`` in the batch),
    so ``Σ_i w_i f(x_i) = Σ_k π_k mean_{y_i = k} f(x_i)`` is the stratified estimate of
    ``E_{Σ π_k P_k}[f]``. Classes absent from the batch cannot be estimated; their weight is spread over
    the present classes (``π`` renormalised over them), so the weights always sum to one.

    Args:
        labels: ``[N]`` integer labels in ``0..K-1``.
        proportions: ``[K]`` proportions (may carry gradients).

    Returns:
        ``[N]`` weights, differentiable w.r.t. ``proportions``.

    Raises:
        ValueError: on labels outside ``0..K-1`` or an empty batch.
    """
    check_finite("proportions", proportions)
    k = _check_proportions_shape(proportions)
    labels = labels.reshape(-1).long()
    if labels.numel() == 0:
        raise ValueError("labels must not be empty")
    if int(labels.min()) < 0 or int(labels.max()) >= k:
        raise ValueError(f"labels must lie in 0..{k - 1} (one per mixture component), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")
    counts = torch.bincount(labels, minlength=k).to(proportions.dtype)
    present = counts > 0
    pi = proportions * present
    pi = pi / pi.sum().clamp_min(torch.finfo(pi.dtype).tiny)
    return (pi / counts.clamp_min(1))[labels]


def mixture_expectation(component_scores: ComponentScores, proportions: torch.Tensor,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_k π_k E_{P_k}[f]`` from critic scores of samples of each component.

    ``component_scores`` is one of

    * a ``[K, M]`` (or ``[K, M, 1]``) tensor: ``M`` scores of samples of each component;
    * a sequence of ``K`` tensors (one per component, sizes may differ);
    * a flat ``[N]`` tensor of scores of a labelled batch, with ``labels`` ``[N]`` naming each sample's
      component (the class-conditional source mixture of domain adaptation; see
      :func:`class_mixture_weights` for absent classes).

    Raises:
        ValueError: if the number of components and of proportions differ, or a component is empty.
    """
    check_finite("component_scores", component_scores)
    check_finite("proportions", proportions)
    if labels is not None:
        if not torch.is_tensor(component_scores):
            raise ValueError("with labels, component_scores must be one tensor of per-sample scores")
        scores = component_scores.reshape(component_scores.shape[0], -1)
        if scores.shape[1] != 1:
            raise ValueError(f"the critic must give one score per sample, got shape {tuple(component_scores.shape)}")
        if labels.numel() != scores.shape[0]:
            raise ValueError(f"labels has {labels.numel()} entries but there are {scores.shape[0]} scores")
        return (class_mixture_weights(labels, proportions) * scores[:, 0]).sum()
    if torch.is_tensor(component_scores):
        if component_scores.ndim < 2:
            raise ValueError("component_scores must be [K, M] (or pass labels for a flat batch), "
                             f"got shape {tuple(component_scores.shape)}")
        k = _check_proportions_shape(proportions, component_scores.shape[0])
        means = component_scores.reshape(k, -1).mean(dim=1)
    else:
        k = _check_proportions_shape(proportions, len(component_scores))
        for i, s in enumerate(component_scores):
            if s.numel() == 0:
                raise ValueError(f"component {i} has no samples")
        means = torch.stack([s.reshape(-1).mean() for s in component_scores])
    return (proportions.to(means.dtype) * means).sum()


def normalized_wasserstein(target_scores: torch.Tensor, component_scores: ComponentScores,
                           proportions: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The NW critic objective: ``E_{x~P_X}[D(x)] - Σ_k π_k E_{P_k}[D]``.

    For a 1-Lipschitz critic ``D`` this lower-bounds ``W(P_X, Σ_k π_k P_k)`` (Kantorovich–Rubinstein), with
    equality at the optimal critic; the paper's ``W_N`` term is ``min_π max_D`` of it. So

    * the critic **maximises** it (its loss is ``-normalized_wasserstein(...)`` plus a Lipschitz penalty or
      weight clipping),
    * the proportions ``π`` (and the components' generators, or the feature extractor) **minimise** it.

    With ``π`` fixed to the true proportions of the target mixture this is exactly the plain Wasserstein
    dual ``E_X[D] - E_{P_{G,π}}[D]`` (the stratified estimate of the mixture term).

    Args:
        target_scores: ``[N]`` (or ``[N, 1]``) critic scores of target samples ``x ~ P_X`` (real data).
        component_scores: critic scores of each component's samples (see :func:`mixture_expectation`).
        proportions: ``[K]`` mixture proportions, e.g. ``MixtureProportions(K)()``; gradients flow to it.
        labels: component of each sample when ``component_scores`` is a flat labelled batch.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: on inconsistent numbers of components or scores that are not one per sample.

    Example:
        >>> pi = MixtureProportions(3)
        >>> fake = torch.stack([g(z) for g in generators])            # [3, B, 2]
        >>> nw = normalized_wasserstein(critic(real), critic(fake.flatten(0, 1)).view(3, -1), pi())
        >>> critic_loss, generator_loss = -nw, nw                     # (critic step uses pi().detach())
    """
    check_finite("target_scores", target_scores)
    check_finite("component_scores", component_scores)
    check_finite("proportions", proportions)
    t = target_scores.reshape(target_scores.shape[0], -1) if target_scores.ndim else target_scores.reshape(1, 1)
    if t.shape[1] != 1 or t.shape[0] == 0:
        raise ValueError(f"target_scores must hold one score per target sample, got shape {tuple(target_scores.shape)}")
    return t[:, 0].mean() - mixture_expectation(component_scores, proportions, labels)


def sample_mixture(component_samples: torch.Tensor, proportions: torch.Tensor, n: int | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` samples of the π-mixture from ``M`` samples of each of the ``K`` components.

    Row ``j`` of the output is sample ``j mod M`` of component ``c_j``, ``c_j ~ Categorical(π)``
    independently, so when the component samples are independent draws the rows are exact draws from
    ``Σ_k π_k P_k``. Used for the gradient penalty of WGAN-GP, which needs samples of the mixture
    itself (the authors' code takes ``ceil(π_k B)`` samples of each component instead).

    Args:
        component_samples: ``[K, M, ...]``.
        proportions: ``[K]`` (detached inside: drawing is not differentiable).
        n: number of samples (``M`` by default).
        generator: random generator of the component draws.

    Returns:
        ``(samples [n, ...], components [n])``.
    """
    check_finite("component_samples", component_samples)
    check_finite("proportions", proportions)
    k = _check_proportions_shape(proportions, component_samples.shape[0])
    m = component_samples.shape[1]
    n = m if n is None else check_positive_int("n", n)
    pi = proportions.detach().to(device=component_samples.device, dtype=torch.float64)
    comp = torch.multinomial(pi, n, replacement=True, generator=generator) if k > 1 else \
        torch.zeros(n, dtype=torch.long, device=component_samples.device)
    rows = torch.arange(n, device=component_samples.device) % m
    return component_samples[comp, rows], comp


# ---- adversarial estimation on any data ------------------------------------------------------------
class NWEstimate(NamedTuple):
    """Result of :func:`estimate_normalized_wasserstein`: the dual value and the minimising ``π``."""

    value: float
    proportions: torch.Tensor
    history: list[float]


def _default_critic(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128), nn.LeakyReLU(0.2),
                         nn.Linear(128, 1))


def estimate_normalized_wasserstein(
    target: torch.Tensor,
    components: Sequence[torch.Tensor],
    critic: nn.Module | None = None,
    proportions: Sequence[float] | torch.Tensor | None = None,
    learn_proportions: bool = True,
    steps: int = 2000,
    batch_size: int = 256,
    n_critic: int = 5,
    critic_lr: float = 1e-3,
    proportions_lr: float = 1e-2,
    gp_weight: float = 10.0,
    eval_samples: int = 4096,
    seed: int = 0,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
) -> NWEstimate:
    """Estimate ``min_π W(P_X, Σ_k π_k P_k)`` adversarially from samples (the NW term with given components).

    Trains a WGAN-GP critic to maximise :func:`normalized_wasserstein` while ``π = softmax(θ)`` minimises
    it (one ``θ`` step per ``n_critic`` critic steps). Simultaneous min-max updates orbit the saddle point,
    so the returned ``π`` is the average of the iterates over the second half of the run (the ergodic
    average, which converges for this convex-concave problem); the dual is then evaluated with that ``π``
    on up to ``eval_samples`` samples. With
    ``learn_proportions=False`` and ``proportions`` set, this is the plain Wasserstein dual to that mixture
    (pass a single component for ``W(P_X, P_Y)``).

    Args:
        target: ``[N, ...]`` samples of ``P_X``.
        components: ``K`` tensors ``[M_k, ...]`` of samples of each component.
        critic: maps samples to one score each; a LeakyReLU MLP (128-128) on flattened samples if ``None``.
        proportions: initial (or fixed) ``π``; uniform if ``None``.
        learn_proportions: optimise ``π`` (NW) or keep it fixed (W to the given mixture).
        steps: critic steps.
        batch_size: samples per step from the target and from each component.
        n_critic: critic steps per ``π`` step.
        critic_lr, proportions_lr: Adam learning rates (betas 0.5, 0.9).
        gp_weight: gradient-penalty weight keeping the critic near 1-Lipschitz.
        eval_samples: samples used for the final dual value.
        seed: seed of the critic initialisation and of the batches.
        optimizer: ``(params, lr) -> Optimizer`` replacing Adam.

    Returns:
        :class:`NWEstimate` ``(value, proportions, history)``, ``history`` the dual value every 100 steps.

    Raises:
        ValueError: on no components, empty sample sets or sample shapes that differ.

    Example:
        >>> est = estimate_normalized_wasserstein(x, [c0, c1, c2], steps=1000)
        >>> est.value, est.proportions
    """
    check_finite("target", target)
    check_finite("components", components)
    check_finite("proportions", proportions)
    if len(components) == 0:
        raise ValueError("components must hold at least one sample set (K >= 1)")
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    check_positive_int("n_critic", n_critic)
    check_positive("critic_lr", critic_lr)
    check_positive("proportions_lr", proportions_lr)
    check_non_negative("gp_weight", gp_weight)
    check_positive_int("eval_samples", eval_samples)
    shape = tuple(target.shape[1:])
    if target.shape[0] == 0:
        raise ValueError("target must hold at least one sample")
    for i, c in enumerate(components):
        if c.shape[0] == 0:
            raise ValueError(f"components[{i}] has no samples")
        if tuple(c.shape[1:]) != shape:
            raise ValueError(f"components[{i}] has samples of shape {tuple(c.shape[1:])}, target has {shape}")
    k = len(components)
    device = target.device
    default_critic = critic is None
    if critic is None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            critic = _default_critic(math.prod(shape)).to(device)
    pi_mod = MixtureProportions(k, proportions, learnable=learn_proportions).to(device)
    make_opt = optimizer or (lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9)))
    opt_d = make_opt(critic.parameters(), critic_lr)
    opt_pi = make_opt([pi_mod.logits], proportions_lr) if learn_proportions else None
    g = torch.Generator(device=device).manual_seed(seed + 1)

    def draw(data: torch.Tensor, n: int) -> torch.Tensor:
        return data[torch.randint(0, data.shape[0], (n,), generator=g, device=device)]

    def scores(x: torch.Tensor) -> torch.Tensor:
        return critic(x.flatten(1) if default_critic else x).reshape(x.shape[0])

    history: list[float] = []
    pi_sum = torch.zeros(k, device=device)
    pi_count = 0
    with model_mode(critic, "train"):
        for step in range(steps):
            x = draw(target, batch_size)
            comp = torch.stack([draw(c, batch_size) for c in components])
            pi = pi_mod()
            s_x, s_c = scores(x), scores(comp.flatten(0, 1)).view(k, batch_size)
            nw = normalized_wasserstein(s_x, s_c, pi.detach())
            loss = -nw
            if gp_weight > 0:
                mix, _ = sample_mixture(comp, pi, batch_size, g)
                eps = torch.rand(batch_size, *([1] * len(shape)), generator=g, device=device)
                x_hat = (eps * x + (1 - eps) * mix).requires_grad_(True)
                (grad,) = torch.autograd.grad(scores(x_hat).sum(), x_hat, create_graph=True)
                loss = loss + gp_weight * ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
            opt_d.zero_grad(set_to_none=True)
            loss.backward()
            opt_d.step()
            if opt_pi is not None and step % n_critic == n_critic - 1:
                # π minimises the dual for the current critic (its gradient needs only the scores).
                pi_loss = normalized_wasserstein(s_x.detach(), s_c.detach(), pi_mod())
                opt_pi.zero_grad(set_to_none=True)
                pi_loss.backward()
                opt_pi.step()
            if step >= steps // 2:
                pi_sum += pi_mod.proportions
                pi_count += 1
            if step % 100 == 0 or step == steps - 1:
                history.append(float(nw.detach()))
        pi_final = pi_sum / pi_count if learn_proportions else pi_mod.proportions
        with torch.no_grad():
            n_eval = min(eval_samples, target.shape[0])
            ev_x = scores(target[:n_eval])
            ev_c = [scores(c[:eval_samples]) for c in components]
            value = float(normalized_wasserstein(ev_x, ev_c, pi_final))
    return NWEstimate(value, pi_final.cpu(), history)


# ---- primal, entropic solver ------------------------------------------------------------------------
class NWSinkhornResult(NamedTuple):
    """Result of :func:`normalized_wasserstein_sinkhorn`.

    Attributes:
        value: ``<C, γ>``, the transport cost of the entropic plan (``[B]`` when batched).
        proportions: ``[K]`` (or ``[B, K]``) mixture proportions of the plan's second marginal.
        plan: ``[n, m]`` (or ``[B, n, m]``) transport plan.
        iterations: Bregman iterations run.
    """

    value: torch.Tensor
    proportions: torch.Tensor
    plan: torch.Tensor
    iterations: int


def _pairwise_cost(x: torch.Tensor, y: torch.Tensor, power: int) -> torch.Tensor:
    d = torch.cdist(x.flatten(1).double(), y.flatten(1).double())
    return d.pow(2) if power == 2 else d


def _nw_sinkhorn_cost(cost: torch.Tensor, groups: torch.Tensor, k: int, proportions: torch.Tensor | None,
                      reg: float, max_iter: int, tol: float, method: str = "auto") -> NWSinkhornResult:
    """Iterative Bregman projections for ``min_{γ, π} <C, γ> + ε KL(γ)`` s.t. ``γ1 = 1/n`` and
    ``γᵀ1 = Σ_k π_k u_k`` (``u_k`` uniform on the columns of group ``k``), batched over ``cost [B, n, m]``.

    The row projection is Sinkhorn's. The column constraint set (equal column sums within each group,
    total mass one) is affine, and its KL projection scales the columns of group ``k`` to the geometric
    mean of their current sums (renormalised), so ``π`` is optimised in closed form at every iteration.
    With ``proportions`` given, the columns are projected onto the fixed marginal instead (plain Sinkhorn).

    ``method="auto"`` iterates on scaling vectors, ``γ = diag(u) K diag(v)`` with the stabilised kernel
    ``K = exp((f ⊕ g - C) / ε)``: two matrix-vector products per iteration, into preallocated buffers, and
    one convergence test every 10 iterations, as POT's ``sinkhorn``. Where ``exp(-C/ε)`` cannot underflow
    (cost range below ``500 ε``) the potentials ``f, g`` stay zero and the loop runs without clamps; should a
    scaling still leave the float range (a non-finite error at a test), it restarts stabilised. Otherwise
    this is POT's ``sinkhorn_stabilized`` scheme: when ``u`` or ``v`` leave ``[e^-50, e^50]``, or a row or
    column sum of ``K`` gets near the underflow limit, they are absorbed into ``f, g`` (``f += ε log u``),
    one log-domain iteration repairs any row or column that underflowed, and ``K`` is rebuilt. Between
    absorptions the iterates are the log-domain ones (``method="log"``, the reference, kept for tests) up to
    rounding, and both converge to the same plan.
    """
    b, n, m = cost.shape
    eps = reg
    log_a = torch.full((b, n), -math.log(n), dtype=cost.dtype, device=cost.device)
    counts = torch.bincount(groups, minlength=k).to(cost.dtype)
    onehot = F.one_hot(groups, k).to(cost.dtype)  # [m, K]
    log_counts = counts.log()
    fixed_log_b = None
    if proportions is not None:
        fixed_log_b = (proportions.to(cost.dtype).clamp_min(1e-300).log() - log_counts)[groups]  # [m]

    def column_target(log_s: torch.Tensor) -> torch.Tensor:
        """Log of the projected column sums given the current log column sums ``log_s [B, m]``."""
        if fixed_log_b is not None:
            return fixed_log_b.expand(b, m)
        mu = (log_s @ onehot) / counts                                 # [B, K]: mean log column sum per group
        log_m = mu - torch.logsumexp(mu + log_counts, dim=1, keepdim=True)
        return log_m[:, groups]

    def log_iteration(f: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One row and one column projection on the potentials (``γ = exp((f ⊕ g - c) / ε)``)."""
        f = eps * (log_a - torch.logsumexp((g[:, None, :] - c) / eps, dim=2))
        lse_cols = torch.logsumexp((f[:, :, None] - c) / eps, dim=1)  # [B, m]
        return f, eps * (column_target(lse_cols + g / eps) - lse_cols)

    it = 0
    if method == "log":
        f = torch.zeros(b, n, dtype=cost.dtype, device=cost.device)
        g = torch.zeros(b, m, dtype=cost.dtype, device=cost.device)
        for it in range(1, max_iter + 1):
            f, g = log_iteration(f, g, cost)
            if it % 10 == 0 or it == max_iter:
                row = torch.logsumexp((f[:, :, None] + g[:, None, :] - cost) / eps, dim=2).exp()
                if float((row - log_a.exp()).abs().sum(dim=1).max()) < tol:
                    break
        plan = ((f[:, :, None] + g[:, None, :] - cost) / eps).exp()
    elif method == "auto":
        plan, it = _scaling_iterations(cost, log_a, fixed_log_b, column_target, log_iteration, eps, max_iter, tol)
    else:
        raise ValueError(f"method must be 'auto' or 'log', got {method!r}")
    value = torch.bmm(plan.reshape(b, 1, n * m), cost.reshape(b, n * m, 1)).view(b)  # <γ, C>, no n x m temporary
    pi = plan.sum(dim=1) @ onehot
    return NWSinkhornResult(value, pi, plan, it)


# Scaling vectors are absorbed into the potentials when they leave [e^-50, e^50], and a row or column of
# the kernel whose sum falls below _TINY counts as underflowing.
_ABSORB, _TINY = 50.0, 1e-250


def _scaling_iterations(cost: torch.Tensor, log_a: torch.Tensor, fixed_log_b: torch.Tensor | None,
                        column_target: Callable[[torch.Tensor], torch.Tensor],
                        log_iteration: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                tuple[torch.Tensor, torch.Tensor]],
                        eps: float, max_iter: int, tol: float, stabilised: bool = False) -> tuple[torch.Tensor, int]:
    """The scaling-vector loop of :func:`_nw_sinkhorn_cost` (``method="auto"``); returns ``(plan, iterations)``."""
    b, n, m = cost.shape
    c_min = cost.amin(dim=(1, 2), keepdim=True)  # the cost is shifted, so that the plain kernel is at most 1
    stabilised = stabilised or float((cost.amax(dim=(1, 2), keepdim=True) - c_min).max()) / eps >= 500
    c = cost - c_min if stabilised else cost
    f = torch.zeros(b, n, dtype=cost.dtype, device=cost.device)
    g = torch.zeros(b, m, dtype=cost.dtype, device=cost.device)
    if stabilised:  # start from one log-domain iteration, so that no row or column of K is all zeros
        f, g = log_iteration(f, g, c)
    a = log_a.exp()
    fixed_b = None if fixed_log_b is None else fixed_log_b.exp().expand(b, m)
    # Every vector lives in a buffer that is only written in place, so that the product closures below can
    # hold views of it: no allocation and no indexing in the loop (its overhead rivals a 300x300 product).
    u = torch.ones(b, n, dtype=cost.dtype, device=cost.device)
    v = torch.ones(b, m, dtype=cost.dtype, device=cost.device)
    kv = torch.empty(b, n, dtype=cost.dtype, device=cost.device)
    ktu = torch.empty(b, m, dtype=cost.dtype, device=cost.device)

    def build() -> tuple[torch.Tensor, Callable[[], object], Callable[[], object]]:
        kern = cost.sub(c_min) if not stabilised else (f[:, :, None] + g[:, None, :]).sub_(c).neg_()
        kern = kern.div_(-eps).exp_()
        if b == 1:  # BLAS gemv on K and on its transposed view (no transposed copy)
            k0, kt0, u0, v0, kv0, ktu0 = kern[0], kern[0].T, u[0], v[0], kv[0], ktu[0]
            return kern, (lambda: torch.mv(k0, v0, out=kv0)), (lambda: torch.mv(kt0, u0, out=ktu0))
        kt, u3, v3, kv3, ktu3 = kern.transpose(1, 2), u[:, :, None], v[:, :, None], kv[:, :, None], ktu[:, :, None]
        return kern, (lambda: torch.bmm(kern, v3, out=kv3)), (lambda: torch.bmm(kt, u3, out=ktu3))

    def absorb(with_u: bool) -> None:
        # Move the scalings into the potentials (γ unchanged), so that K is rebuilt around the current plan.
        if with_u:
            f.add_(u.log().mul_(eps))
        g.add_(v.log().mul_(eps))
        u.fill_(1.0)
        v.fill_(1.0)

    kern, k_v, kt_u = build()
    u_fresh = False  # whether u holds the row scaling of the current iterate (False after an absorption)
    it = 0
    for it in range(1, max_iter + 1):
        k_v()
        if stabilised and float(kv.amin()) < _TINY:  # a row underflowed: absorb and repair in the log domain
            absorb(u_fresh)
            f, g = log_iteration(f, g, c)
            (kern, k_v, kt_u), u_fresh = build(), False
            k_v()
        if stabilised:
            kv.clamp_min_(1e-300)
        # The columns are exact here, so u * kv is the row marginal: the test costs no extra product.
        if u_fresh and (it % 10 == 1 or it == max_iter):
            err = float((u * kv - a).abs().sum(dim=1).max())
            if err < tol:
                break
            if not math.isfinite(err) and not stabilised:
                # Without clamps (they cost as much as a small product), a scaling that left the float range
                # shows here: start again with stabilised potentials.
                return _scaling_iterations(cost, log_a, fixed_log_b, column_target, log_iteration, eps, max_iter,
                                           tol, stabilised=True)
        torch.div(a, kv, out=u)
        u_fresh = True
        kt_u()
        if stabilised and float(ktu.amin()) < _TINY:  # a column underflowed
            absorb(True)
            f, g = log_iteration(f, g, c)
            (kern, k_v, kt_u), u_fresh = build(), False
            kt_u()
        if stabilised:
            ktu.clamp_min_(1e-300)
        if fixed_b is not None:  # plain Sinkhorn: the columns are scaled straight to the fixed marginal
            torch.div(fixed_b, ktu, out=v)
        else:  # the current column sums are v * ktu
            v.copy_(column_target(v.log() + ktu.log()).exp_().div_(ktu))
        if stabilised and float(torch.stack([u.amin(), u.amax(), v.amin(), v.amax()]).log().abs().max()) > _ABSORB:
            absorb(u_fresh)
            (kern, k_v, kt_u), u_fresh = build(), False
    if not stabilised:  # no absorption happened, so u is fresh
        return kern.mul_(u[:, :, None]).mul_(v[:, None, :]), it
    absorb(u_fresh)
    return (f[:, :, None] + g[:, None, :]).sub_(c).div_(eps).exp_(), it


def _components_to_support(components: Sequence[torch.Tensor] | torch.Tensor,
                           labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    if labels is not None:
        if not torch.is_tensor(components):
            raise ValueError("with labels, components must be one tensor of samples")
        labels = labels.reshape(-1).long()
        if labels.numel() != components.shape[0]:
            raise ValueError(f"labels has {labels.numel()} entries but components has {components.shape[0]} samples")
        if labels.numel() == 0 or int(labels.min()) < 0:
            raise ValueError("labels must be non-negative component indices")
        k = int(labels.max()) + 1
        empty = (torch.bincount(labels, minlength=k) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"components {empty} have no samples (labels must use every index 0..{k - 1})")
        return components, labels, k
    if torch.is_tensor(components):
        raise ValueError("components must be a sequence of K sample tensors, or one tensor with labels")
    if len(components) == 0:
        raise ValueError("components must hold at least one sample set (K >= 1)")
    for i, c in enumerate(components):
        if c.shape[0] == 0:
            raise ValueError(f"components[{i}] has no samples")
    support = torch.cat(list(components))
    labels = torch.cat([torch.full((c.shape[0],), i, dtype=torch.long, device=c.device)
                        for i, c in enumerate(components)])
    return support, labels, len(components)


def normalized_wasserstein_sinkhorn(
    x: torch.Tensor,
    components: Sequence[torch.Tensor] | torch.Tensor,
    labels: torch.Tensor | None = None,
    proportions: Sequence[float] | torch.Tensor | None = None,
    reg: float = 0.02,
    power: int = 1,
    max_iter: int = 2000,
    tol: float = 1e-6,
) -> NWSinkhornResult:
    """``min_π W(P̂_X, Σ_k π_k P̂_k)`` between empirical measures, by entropic OT with ``π`` optimised exactly.

    The NW term of arXiv 1902.00415 for components known through samples (e.g. the outputs of an
    NW-GAN's generators, or the clusters of a pooled sample), solved in the primal: the transport plan
    ``γ`` from the uniform measure on ``x`` to the mixture whose component ``k`` is uniform on its samples
    with total mass ``π_k``, minimising ``<C, γ> + ε KL`` jointly over ``γ`` and ``π`` (see
    :func:`_nw_sinkhorn_cost`). With ``proportions`` given, ``π`` is fixed and this is the entropic
    Wasserstein distance to that mixture (Sinkhorn). ``ε = reg · mean(C)``, so ``reg`` is scale-free.

    Args:
        x: ``[n, ...]`` samples of ``P_X``.
        components: ``K`` tensors ``[m_k, ...]`` of component samples, or one ``[m, ...]`` tensor with ``labels``.
        labels: ``[m]`` component index of each sample when ``components`` is one tensor.
        proportions: fixed ``π`` (plain Wasserstein to that mixture); optimised when ``None``.
        reg: entropic regularisation relative to the mean cost.
        power: ground cost ``||x - y||^power`` (1: W1, the distance of the paper's duals; 2: squared W2).
        max_iter, tol: stop after ``max_iter`` iterations or when the row marginal's L1 error is below ``tol``.

    Returns:
        :class:`NWSinkhornResult` ``(value, proportions, plan, iterations)``.

    Raises:
        ValueError: on empty components, bad proportions, shape mismatches or bad numbers.

    Example:
        >>> res = normalized_wasserstein_sinkhorn(x, [c0, c1, c2])
        >>> res.value, res.proportions          # ~0 and x's proportions when x is a mixture of c0..c2
    """
    check_finite("x", x)
    check_finite("components", components)
    check_finite("proportions", proportions)
    check_positive("reg", reg)
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    check_positive_int("max_iter", max_iter)
    check_positive("tol", tol)
    support, groups, k = _components_to_support(components, labels)
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one sample")
    if tuple(x.shape[1:]) != tuple(support.shape[1:]):
        raise ValueError(f"x has samples of shape {tuple(x.shape[1:])} but the components have "
                         f"{tuple(support.shape[1:])}")
    pi = None
    if proportions is not None:
        pi = check_probability_vector("proportions", proportions)
        if pi.numel() != k:
            raise ValueError(f"proportions has {pi.numel()} entries but there are {k} components")
        pi = pi.to(x.device)
    cost = _pairwise_cost(x, support.to(x.device), power)
    scale = float(cost.mean()) or 1.0
    res = _nw_sinkhorn_cost(cost[None], groups.to(x.device), k, pi, reg * scale, max_iter, tol)
    return NWSinkhornResult(res.value[0], res.proportions[0], res.plan[0], res.iterations)
