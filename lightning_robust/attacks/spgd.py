"""SPGD: sparse projected gradient descent for interpretable text adversarial examples
(Barham & Feizi, "Interpretable Adversarial Training for Text", arXiv 1905.12864), and its baseline.

SPGD perturbs word embeddings ``e_t = E[x_t]`` by ``r_t`` under two constraints:

* **direction** (interpretability; after Sato et al. 2018's iAdvT-Text): each ``r_t`` must point from ``e_t``
  toward one of its ``K`` nearest vocabulary embeddings by cosine similarity, ``d_tk = (E[v_k] - e_t) /
  ||E[v_k] - e_t||``, and (here) go no farther than that neighbour: ``r_t = s_t d_tk``,
  ``0 <= s_t <= ||E[v_k] - e_t||``.
  The Euclidean projection onto this union of segments picks the neighbour whose direction has the highest
  cosine similarity with ``r_t`` (exactly so when no segment is cut short), ``s_t = clamp(<r_t, d_tk>, 0, dist_tk)``;
* **sentence-level sparsity**: word perturbations whose norm is below a threshold are dropped (relative to the
  largest in the sentence by default), and at most ``max_words`` words keep one (the projection onto
  ``max_words``-sparse sequences keeps the rows whose projection removes the most squared distance).

Each PGD step ascends the sequence-normalised loss gradient and projects. The final perturbation maps back to
tokens by the rule shared by every text attack (:meth:`~lightning_robust.attacks.text.TextAttack.round`): each
word becomes the vocabulary word nearest to ``e_t + r_t`` (for SPGD's segments: the chosen neighbour once past
the segment's midpoint, unless a third word is nearer still). Adversarial training (the paper's "interpretable
adversarial training") adds the loss at ``E[x] + r`` for the continuous SPGD perturbation ``r``.

The paper's baselines, implemented here with the same discretisation and stopping rules:

* :class:`AdvTText` (Miyato et al. 2017): one sequence-normalised gradient step of L2 norm ``xi``, every word
  perturbed;
* :class:`IAdvTText` (Sato et al. 2018): one step along a signed, per-word L2-normalised combination of the
  directions to each word's 10 nearest words by cosine similarity, normalised over the sentence, norm ``xi``;
* :class:`EmbeddingPGD`: the iterated AdvT perturbation, an L2 ball of radius ``eps`` (in units of the mean
  word-embedding norm) on the whole sequence's perturbation.

The SPGD paper evaluates with a pretrained LSTM on IMDB; no public code is known, so the details above that the
abstract leaves open (the segment cap, the relative threshold) are this implementation's choices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_robust.attacks.text import TextAttack
from lightning_robust.utils.validation import check_choice, check_non_negative, check_positive, check_positive_int

__all__ = [
    "SPGD",
    "AdvTText",
    "EmbeddingPGD",
    "IAdvTText",
    "cached_neighbours",
    "nearest_other_distance",
    "nearest_tokens",
    "neighbour_directions",
    "project_onto_neighbours",
    "sparsify_words",
]


# ---- pure functions -----------------------------------------------------------------------------------
def neighbour_directions(embeddings: torch.Tensor, token_ids: torch.Tensor, k: int,
                         allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` nearest vocabulary embeddings of each token by cosine similarity, and the unit directions to them.

    Args:
        embeddings: ``[V, D]`` table.
        token_ids: ``[U]`` tokens whose neighbours to find.
        k: neighbours per token (at most the number of allowed tokens other than itself).
        allowed: ``[V]`` bool, tokens that may be neighbours (default all); a token is never its own
            neighbour, nor is a token with the very same embedding.

    Returns:
        ``(neighbours [U, k], directions [U, k, D], distances [U, k])`` with ``directions = (E[n] - E[t]) / dist``.
    """
    V = embeddings.shape[0]
    allowed = torch.ones(V, dtype=torch.bool, device=embeddings.device) if allowed is None else allowed
    unit = embeddings / embeddings.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sims = unit[token_ids] @ unit.T  # [U, V]
    sims = sims.masked_fill(~allowed.unsqueeze(0), float("-inf"))
    sims[torch.arange(len(token_ids), device=sims.device), token_ids] = float("-inf")
    k = min(k, max(int(allowed.sum()) - 1, 1))
    _, nbr = sims.topk(k, dim=1)
    diff = embeddings[nbr] - embeddings[token_ids].unsqueeze(1)  # [U, k, D]
    dist = diff.norm(dim=-1)
    dirs = diff / dist.clamp_min(1e-12).unsqueeze(-1)
    # Exclude degenerate neighbours (same vector, or a disallowed token picked because too few were allowed).
    bad = (dist <= 1e-8) | ~allowed[nbr]
    dirs = dirs.masked_fill(bad.unsqueeze(-1), 0.0)
    dist = dist.masked_fill(bad, 0.0)
    return nbr, dirs, dist


# Neighbour lists depend only on the embedding table, which stays fixed while an attack runs and, with frozen word
# vectors, across a whole training run. They are computed per token on first use and kept here, keyed by the
# table's storage, in-place version counter (an optimizer step bumps it) and sum (a freed table's memory may hold
# another table of the same shape and version, e.g. the next model loaded in an evaluation loop), so an Attack object
# itself stays a plain bag of hyper-parameters. Only the most recent tables are kept. With ``refresh > 0`` the
# version and sum are left out of the key and the lists are dropped only every ``refresh`` calls after the table
# changed (Sato et al.'s periodic nearest-word table; meant for the attack of one training run).
_CACHE: dict[tuple[Any, ...], dict[str, Any]] = {}
_CACHE_SIZE = 2


def _cache_for(embeddings: torch.Tensor, kind: str, k: int, allowed: torch.Tensor,
               refresh: int = 0) -> dict[str, Any]:
    version = (embeddings._version, float(embeddings.sum())) if refresh == 0 else f"every{refresh}"
    key = (kind, embeddings.data_ptr(), version, tuple(embeddings.shape), str(embeddings.device),
           embeddings.dtype, k, hash(tuple(allowed.logical_not().nonzero().flatten().tolist())))
    entry = _CACHE.get(key)
    if entry is None:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        entry = _CACHE[key] = {"known": torch.zeros(embeddings.shape[0], dtype=torch.bool, device=embeddings.device),
                               "version": embeddings._version, "calls": 0}
    if refresh:
        entry["calls"] += 1
        if entry["version"] != embeddings._version and entry["calls"] > refresh:
            # the table changed and the lists are ``refresh`` calls old: recompute them (lazily, per token)
            entry["known"].zero_()
            entry["version"], entry["calls"] = embeddings._version, 1
    return entry


def cached_neighbours(embeddings: torch.Tensor, token_ids: torch.Tensor, k: int, allowed: torch.Tensor,
                      refresh: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`neighbour_directions` for unique ``token_ids``, computing only tokens not seen with this table.

    ``refresh = 0``: the lists are recomputed whenever the table changes in place (exact). ``refresh = n > 0``:
    which words are the neighbours is recomputed only on the first call after the table changed that is more than
    ``n`` calls after the last recomputation (so, called once per training step, every ``n`` steps), as Sato et al.'s
    code recomputes its nearest-word table once per epoch (``update_nearest_epoch=1``); the directions and
    distances to those neighbours always come from the current table.
    """
    entry = _cache_for(embeddings, "nbr", k, allowed, refresh)
    missing = token_ids[~entry["known"][token_ids]]
    if missing.numel():
        nbr, _, dist = neighbour_directions(embeddings, missing, k, allowed)
        if "nbr" not in entry:
            V = embeddings.shape[0]
            entry["nbr"] = torch.zeros(V, nbr.shape[1], dtype=torch.long, device=embeddings.device)
            entry["dist"] = torch.zeros(V, nbr.shape[1], dtype=embeddings.dtype, device=embeddings.device)
        entry["nbr"][missing], entry["dist"][missing] = nbr, dist
        entry["known"][missing] = True
    nbr, dist = entry["nbr"][token_ids], entry["dist"][token_ids]
    diff = embeddings[nbr] - embeddings[token_ids].unsqueeze(1)
    if refresh:  # the lists may be older than the table: distances from the current table (0 stays "excluded")
        dist = torch.where(dist > 0, diff.norm(dim=-1), dist)
    dirs = (diff / dist.clamp_min(1e-12).unsqueeze(-1)).masked_fill((dist <= 0).unsqueeze(-1), 0.0)
    return nbr, dirs, dist


def nearest_other_distance(embeddings: torch.Tensor, token_ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``[N]`` Euclidean distance from each token's embedding to the nearest *other* allowed embedding (cached
    per token like :func:`cached_neighbours`); a perturbation shorter than half of it cannot change the word."""
    uniq, inverse = torch.unique(token_ids, return_inverse=True)
    E = embeddings
    entry = _cache_for(E, "nn_dist", 1, allowed)
    missing = uniq[~entry["known"][uniq]]
    if missing.numel():
        d2 = (E[missing] * E[missing]).sum(1, keepdim=True) - 2 * E[missing] @ E.T + (E * E).sum(1).unsqueeze(0)
        d2 = d2.masked_fill(~allowed.unsqueeze(0), float("inf"))
        d2[torch.arange(len(missing), device=E.device), missing] = float("inf")
        if "nn_dist" not in entry:
            entry["nn_dist"] = torch.zeros(E.shape[0], dtype=E.dtype, device=E.device)
        entry["nn_dist"][missing] = d2.clamp_min(0).min(dim=1).values.sqrt()
        entry["known"][missing] = True
    return entry["nn_dist"][uniq][inverse]


def project_onto_neighbours(r: torch.Tensor, directions: torch.Tensor, distances: torch.Tensor | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Euclidean projection of each row of ``r`` onto the union of segments ``{s d_k : 0 <= s <= dist_k}``.

    ``||r - s d||^2 = ||r||^2 - (2 s <r, d> - s^2)``, so the best segment maximises the gain ``2 s a_k - s^2``
    with ``s = clamp(a_k, 0, dist_k)``, ``a_k = <r, d_k>``; without caps (``distances=None``) that is the
    direction of highest cosine similarity with ``r``, and the gain is ``max(a_k, 0)^2``.

    Args:
        r: ``[N, D]`` perturbations.
        directions: ``[N, K, D]`` unit directions (zero rows = unavailable).
        distances: ``[N, K]`` segment lengths, or ``None`` for rays.

    Returns:
        ``(projection [N, D], choice [N] in 0..K-1, length [N] = s, gain [N])``.
    """
    a = torch.einsum("nd,nkd->nk", r, directions)
    s = a.clamp_min(0.0) if distances is None else torch.minimum(a.clamp_min(0.0), distances)
    gain = 2 * s * a - s * s
    best_gain, choice = gain.max(dim=1)
    length = s.gather(1, choice.unsqueeze(1)).squeeze(1)
    chosen = directions.gather(1, choice.view(-1, 1, 1).expand(-1, 1, directions.shape[-1])).squeeze(1)
    return length.unsqueeze(1) * chosen, choice, length, best_gain


def sparsify_words(norms: torch.Tensor, gains: torch.Tensor | None = None, threshold: float = 0.0,
                   relative: bool = True, max_words: int | None = None) -> torch.Tensor:
    """Which word perturbations survive the sentence-level sparsity constraint.

    A word is kept when its perturbation norm is at least ``threshold`` (times the largest norm in its
    sentence when ``relative``) and is nonzero, and when it ranks among the ``max_words`` words of its sentence
    with the largest ``gains`` (default: the norms).

    Args:
        norms: ``[B, L]`` per-word perturbation norms (0 where nothing may change).
        gains: ``[B, L]`` ranking scores for the ``max_words`` cap.
        threshold: norm threshold (fraction of the sentence maximum when ``relative``).
        relative: interpret ``threshold`` relative to each sentence's largest word norm.
        max_words: at most this many words per sentence (``None``: no cap).

    Returns:
        ``[B, L]`` bool mask of kept words.
    """
    keep = norms > 0
    if threshold > 0:
        bar = threshold * norms.amax(dim=1, keepdim=True) if relative else torch.full_like(norms, threshold)
        keep &= norms >= bar
    if max_words is not None and max_words < norms.shape[1]:
        score = (norms if gains is None else gains).masked_fill(~keep, float("-inf"))
        top = score.topk(max_words, dim=1).indices
        capped = torch.zeros_like(keep)
        capped.scatter_(1, top, True)
        keep &= capped
    return keep


def nearest_tokens(points: torch.Tensor, embeddings: torch.Tensor, original: torch.Tensor,
                   allowed: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """The allowed token whose embedding is nearest (Euclidean) to each point; ties keep ``original``.

    Args:
        points: ``[N, D]``; embeddings: ``[V, D]``; original: ``[N]`` the tokens the points started from;
        allowed: ``[V]`` bool tokens that may be produced (the original always may).
    """
    out = original.clone()
    E2 = (embeddings * embeddings).sum(1)
    for lo in range(0, points.shape[0], chunk):
        p = points[lo: lo + chunk]
        d = E2.unsqueeze(0) - 2 * p @ embeddings.T  # ||p - e||^2 up to the row constant ||p||^2
        if allowed is not None:
            d = d.masked_fill(~allowed.unsqueeze(0), float("inf"))
        best_d, best = d.min(dim=1)
        orig = original[lo: lo + chunk]
        d_orig = E2[orig] - 2 * (p * embeddings[orig]).sum(1)
        out[lo: lo + chunk] = torch.where(best_d < d_orig - 1e-6 * d_orig.abs().clamp_min(1.0), best, orig)
    return out


# ---- attacks ------------------------------------------------------------------------------------------
class SPGD(TextAttack):
    """Sparse projected gradient descent for text (Barham & Feizi 2019, arXiv 1905.12864).

    ``r <- P_sparse(P_dir(r + alpha s g/||g||))``: ``P_dir`` projects each word's perturbation onto the segments
    toward its ``num_neighbours`` nearest embeddings by cosine similarity, ``P_sparse`` drops words below the
    threshold and keeps at most ``max_words``; word ``t`` becomes its chosen neighbour once it is past the
    segment's midpoint. See the module docstring for the details.

    Args:
        max_words: most words changed per sequence (``None``: no cap; only the threshold sparsifies).
        threshold: norm threshold for keeping a word's perturbation.
        threshold_mode: ``"relative"`` (fraction of the sentence's largest word perturbation) or ``"absolute"``
            (embedding-space units).
        num_neighbours: ``K``, candidate neighbours per word.
        neighbour_refresh: ``0`` (default): the neighbour lists follow every change of the embedding table
            (exact; with trainable embeddings, adversarial training recomputes them at every step);
            ``n > 0``: during training they are recomputed every ``n`` calls (the directions and distances always
            follow the current table), as Sato et al.'s code recomputes its nearest-word table once per epoch;
            see :func:`cached_neighbours`. It changes nothing while the table is fixed (evaluation).
        eps: optional L2 budget of the whole perturbation, in units of the mean word-embedding norm
            (``None``: the per-word segments are the only bound).
        steps, alpha, loss, targeted, model_mode, random_start, early_stop, protected_ids: see
            :class:`~lightning_robust.attacks.text.TextAttack`.

    Raises:
        ValueError: on non-positive steps / alpha / neighbours / max_words, a negative threshold, a bad mode.

    Example:
        >>> spgd = SPGD(max_words=5, steps=20)
        >>> res = spgd(net, batch["input_ids"], batch["labels"], batch["attention_mask"], tokenizer=dm.text_tokenizer)
        >>> res.summary()["success_rate"], res.text[0]
    """

    def __init__(
        self,
        max_words: int | None = 5,
        threshold: float = 0.5,
        threshold_mode: str = "relative",
        num_neighbours: int = 10,
        eps: float | None = None,
        steps: int = 20,
        alpha: float = 0.25,
        loss: str = "ce",
        targeted: bool = False,
        model_mode: str = "eval",
        random_start: bool = False,
        early_stop: bool = False,
        protected_ids: Sequence[int] = (),
        neighbour_refresh: int = 0,
    ) -> None:
        super().__init__(steps=steps, alpha=alpha, loss=loss, targeted=targeted, model_mode=model_mode,
                         random_start=random_start, early_stop=early_stop, protected_ids=protected_ids)
        self.neighbour_refresh = check_positive_int("neighbour_refresh", neighbour_refresh, minimum=0)
        self.max_words = None if max_words is None else check_positive_int("max_words", max_words)
        self.threshold = float(check_non_negative("threshold", threshold))
        self.threshold_mode = check_choice("threshold_mode", threshold_mode, ("relative", "absolute"))
        if threshold_mode == "relative" and threshold > 1:
            raise ValueError(f"threshold must lie in [0, 1] with threshold_mode='relative', got {threshold!r}")
        self.num_neighbours = check_positive_int("num_neighbours", num_neighbours)
        self.eps = None if eps is None else float(check_positive("eps", eps))

    def prepare(self, embeddings: torch.Tensor, input_ids: torch.Tensor, free: torch.Tensor,
                allowed: torch.Tensor, scale: torch.Tensor) -> dict[str, Any]:
        uniq, inverse = torch.unique(input_ids[free], return_inverse=True)
        nbr, dirs, dist = cached_neighbours(embeddings, uniq, self.num_neighbours, allowed, self.neighbour_refresh)
        return {"nbr": nbr[inverse], "dirs": dirs[inverse], "dist": dist[inverse]}

    def _project_full(self, r: torch.Tensor, ctx: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        free = ctx["free"]
        out = torch.zeros_like(r)
        choice_bl = torch.zeros(free.shape, dtype=torch.long, device=r.device)
        if not bool(free.any()):
            return out, choice_bl
        proj, choice, length, gain = project_onto_neighbours(r[free], ctx["dirs"], ctx["dist"])
        norms = torch.zeros(free.shape, dtype=r.dtype, device=r.device)
        gains = torch.zeros_like(norms)
        norms[free], gains[free] = length, gain
        keep = sparsify_words(norms, gains, self.threshold, self.threshold_mode == "relative", self.max_words)
        out[free] = proj
        out = out * keep.unsqueeze(-1)
        if self.eps is not None:
            budget = self.eps * ctx["scale"]
            n = out.flatten(1).norm(dim=1)
            out = out * torch.where(n > budget, budget / n.clamp_min(1e-12), torch.ones_like(n)).view(-1, 1, 1)
        choice_bl[free] = choice
        return out, choice_bl

    def project(self, r: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return self._project_full(r, ctx)[0]


class EmbeddingPGD(TextAttack):
    """Unconstrained embedding-space PGD with nearest-neighbour rounding (the SPGD paper's baseline family).

    ``r <- Proj_{||r||_2 <= eps s}(r + alpha s g/||g||)`` over the whole sequence (Miyato et al. 2017's
    adversarial perturbation, iterated); every perturbed embedding is then replaced by the nearest vocabulary
    embedding (Euclidean), which changes every word whose perturbation carried it past a neighbour.

    Args:
        eps: L2 budget of the sequence's perturbation, in units of the mean word-embedding norm.
        steps, alpha, loss, targeted, model_mode, random_start, early_stop, protected_ids: see
            :class:`~lightning_robust.attacks.text.TextAttack`.

    Example:
        >>> res = EmbeddingPGD(eps=2.0, steps=20)(net, ids, labels, mask)
    """

    def __init__(
        self,
        eps: float = 2.0,
        steps: int = 20,
        alpha: float = 0.25,
        loss: str = "ce",
        targeted: bool = False,
        model_mode: str = "eval",
        random_start: bool = False,
        early_stop: bool = False,
        protected_ids: Sequence[int] = (),
    ) -> None:
        super().__init__(steps=steps, alpha=alpha, loss=loss, targeted=targeted, model_mode=model_mode,
                         random_start=random_start, early_stop=early_stop, protected_ids=protected_ids)
        self.eps = float(check_positive("eps", eps))

    def prepare(self, embeddings: torch.Tensor, input_ids: torch.Tensor, free: torch.Tensor,
                allowed: torch.Tensor, scale: torch.Tensor) -> dict[str, Any]:
        return {}

    def project(self, r: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        r = r * ctx["free"].unsqueeze(-1)
        budget = self.eps * ctx["scale"]
        n = r.flatten(1).norm(dim=1)
        return r * torch.where(n > budget, budget / n.clamp_min(1e-12), torch.ones_like(n)).view(-1, 1, 1)


class AdvTText(TextAttack):
    """AdvT-Text: the adversarial perturbation in word-embedding space of Miyato et al. 2017 (arXiv 1605.07725).

    One gradient step, normalised over the whole sequence (all words together, Miyato et al.'s ``_scale_l2``):
    ``r = xi * s * g / ||g||_2`` with ``g = grad_r L(E[x] + r, y)`` at ``r = 0`` and ``s`` the mean norm of the
    sequence's word embeddings, so ``||r||_2 = xi * s`` over the sequence and every word is perturbed. As
    adversarial training (``TextClassifier(attack=AdvTText(...))``) the gradient is taken in train mode, dropout
    on, as in the authors' code; as an attack it is rounded to words like every attack here
    (:meth:`~lightning_robust.attacks.text.TextAttack.round`).

    ``xi`` is in units of the mean word-embedding norm so that it carries across embedding tables: Miyato et
    al.'s ``perturb_norm_length = 5`` applies to their frequency-normalised 256-d embeddings, Sato et al.'s
    reimplementation uses ``xi = 5`` on unnormalised 256-d LM embeddings; neither value transfers to GloVe-50d
    as is, so benchmarks sweep ``xi``.

    Args:
        xi: the perturbation's L2 norm over the sequence, in units of the mean word-embedding norm.
        loss, targeted, model_mode, early_stop, protected_ids: see
            :class:`~lightning_robust.attacks.text.TextAttack` (one step, no random start).

    Raises:
        ValueError: a non-positive ``xi``.

    Example:
        >>> res = AdvTText(xi=1.0)(net, ids, labels, mask)
        >>> r = AdvTText(xi=1.0).embedding_perturbation(net, ids, labels, mask, model_mode="train")
    """

    def __init__(self, xi: float = 1.0, loss: str = "ce", targeted: bool = False, model_mode: str = "eval",
                 early_stop: bool = False, protected_ids: Sequence[int] = ()) -> None:
        xi = float(check_positive("xi", xi))
        super().__init__(steps=1, alpha=xi, loss=loss, targeted=targeted, model_mode=model_mode,
                         random_start=False, early_stop=early_stop, protected_ids=protected_ids)
        self.xi = xi

    def prepare(self, embeddings: torch.Tensor, input_ids: torch.Tensor, free: torch.Tensor,
                allowed: torch.Tensor, scale: torch.Tensor) -> dict[str, Any]:
        return {}

    def project(self, r: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return r * ctx["free"].unsqueeze(-1)


class IAdvTText(TextAttack):
    """iAdvT-Text: the interpretable adversarial perturbation of Sato et al. 2018 (arXiv 1805.02917).

    Each word ``t`` may only move along the unit directions ``d_tk = (E[v_k] - e_t) / ||E[v_k] - e_t||`` to its
    ``K`` nearest vocabulary words ``v_k`` by cosine similarity (``K = 10`` in the paper and its code): ``r_t =
    sum_k alpha_tk d_tk``. Following the authors' Chainer code (``aonotas/interpretable-adv``, ``train.py`` and
    ``nets.py``), one step from ``alpha = 0``:

    * ``a_tk = dL/d alpha_tk = <g_t, d_tk>`` with ``g_t`` the loss gradient at word ``t``'s embedding;
    * the weights are L2-normalised over the ``K`` neighbours of each word (``F.normalize(grad, axis=1)``):
      ``w_t = a_t / ||a_t||_2`` (signed; zero when ``a_t = 0``), and ``u_t = sum_k w_tk d_tk``;
    * the perturbation is normalised over the whole sentence and scaled by ``xi`` (``norm_sentence_level=1``):
      ``r = xi * s * u / ||u||_2``, ``s`` being the mean word-embedding norm of the sentence (our unit, see
      :class:`AdvTText`), so every word is perturbed and ``||r||_2 = xi * s``.

    Differences from the authors' code: the directions come from the embedding table itself (their code takes
    them from the dropped-out embeddings in train mode), and the neighbours exclude padding, special and
    protected tokens. Rounded to words like every attack (:meth:`~lightning_robust.attacks.text.TextAttack.round`).

    Args:
        xi: the perturbation's L2 norm over the sentence, in units of the mean word-embedding norm.
        num_neighbours: ``K``.
        neighbour_refresh: ``0`` (default): the neighbour lists follow every change of the embedding table
            (exact; with trainable embeddings, adversarial training recomputes them at every step);
            ``n > 0``: during training they are recomputed every ``n`` calls (the directions and distances always
            follow the current table), as Sato et al.'s code recomputes its nearest-word table once per epoch;
            see :func:`cached_neighbours`. It changes nothing while the table is fixed (evaluation).
        loss, targeted, model_mode, early_stop, protected_ids: see
            :class:`~lightning_robust.attacks.text.TextAttack` (one step, no random start).

    Raises:
        ValueError: a non-positive ``xi`` or ``num_neighbours``.

    Example:
        >>> res = IAdvTText(xi=1.0, num_neighbours=10)(net, ids, labels, mask)
    """

    def __init__(self, xi: float = 1.0, num_neighbours: int = 10, loss: str = "ce", targeted: bool = False,
                 model_mode: str = "eval", early_stop: bool = False, protected_ids: Sequence[int] = (),
                 neighbour_refresh: int = 0) -> None:
        xi = float(check_positive("xi", xi))
        super().__init__(steps=1, alpha=xi, loss=loss, targeted=targeted, model_mode=model_mode,
                         random_start=False, early_stop=early_stop, protected_ids=protected_ids)
        self.xi = xi
        self.num_neighbours = check_positive_int("num_neighbours", num_neighbours)
        self.neighbour_refresh = check_positive_int("neighbour_refresh", neighbour_refresh, minimum=0)

    def prepare(self, embeddings: torch.Tensor, input_ids: torch.Tensor, free: torch.Tensor,
                allowed: torch.Tensor, scale: torch.Tensor) -> dict[str, Any]:
        uniq, inverse = torch.unique(input_ids[free], return_inverse=True)
        _, dirs, _ = cached_neighbours(embeddings, uniq, self.num_neighbours, allowed, self.neighbour_refresh)
        return {"dirs": dirs[inverse]}

    def direction(self, g: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        free = ctx["free"]
        out = torch.zeros_like(g)
        if bool(free.any()):
            dirs = ctx["dirs"]
            a = torch.einsum("nd,nkd->nk", g[free], dirs)
            w = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
            out[free] = torch.einsum("nk,nkd->nd", w, dirs)
        return out

    def project(self, r: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return r * ctx["free"].unsqueeze(-1)
