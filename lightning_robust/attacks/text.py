"""The contract of embedding-space attacks on text classifiers, and their result.

A :class:`TextAttack` holds hyper-parameters only. ``attack(model, input_ids, y, attention_mask)``

* runs gradient steps on a perturbation ``r`` of the input word embeddings ``E[input_ids]`` (the model must
  expose ``get_input_embeddings()`` and accept ``inputs_embeds=``, like Hugging Face models and our text nets),
  projecting after each step onto the attack's constraint set (the subclass's :meth:`~TextAttack.project`;
  one-step attacks such as AdvT-Text and iAdvT-Text take a single step);
* turns the perturbation into words by **one discretisation rule, the same for every attack**
  (:meth:`TextAttack.round`): each perturbable word ``t`` becomes the allowed vocabulary token whose embedding is
  nearest (Euclidean) to ``E[x_t] + r_t``; the original word wins ties, so an unperturbed word never changes.
  Padding, special and protected tokens are never produced, nor are padded or special positions changed;
* applies **one stopping rule, the same for every attack** (``early_stop``, default ``False``): the attack runs
  all its steps and only its *final* perturbation is rounded; the review counts as a success when those tokens
  fool the model. With ``early_stop=True`` (for every attack alike) the perturbation is rounded after each step
  and a review keeps the first token sequence that fools the model. A comparison of "words changed" between
  methods is then a comparison of the methods' perturbations, not of their stopping rules;
* runs the model in eval mode by default (``model_mode``) and restores every submodule's training flag; input
  gradients come from ``torch.autograd.grad``, so parameters' ``.grad`` are untouched; works under
  ``torch.no_grad()`` and ``torch.inference_mode()``; randomness (``random_start``) comes from ``generator``;
* returns a :class:`TextAttackResult`: adversarial ids, changed positions, success, and the decoded texts when a
  tokenizer (anything with ``decode(ids) -> str``) is passed.

It is not an :class:`~lightning_robust.attacks.Attack` subclass: its inputs are token ids rather than images in
a box, and it returns a structured result rather than a perturbed tensor; it shares the loss
(:func:`~lightning_robust.attacks.attack_loss`) and the mode handling (:func:`~lightning_robust.attacks.model_mode`).

``embedding_perturbation(...)`` returns the continuous perturbation instead (for adversarial training in
embedding space, Miyato et al. 2017); its ``model_mode=`` overrides the attack's (adversarial training computes
the perturbation in train mode, dropout on, as Miyato et al. and Sato et al. do).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from lightning_robust.attacks.base import LOSSES, attack_loss
from lightning_robust.utils.modules import MODEL_MODES, model_mode
from lightning_robust.utils.modules import model_mode as model_mode_ctx  # the argument of the same name shadows it
from lightning_robust.utils.validation import check_choice, check_positive, check_positive_int

__all__ = ["TextAttack", "TextAttackResult", "model_logits"]


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


def model_logits(model: nn.Module, **inputs: torch.Tensor | None) -> torch.Tensor:
    """Call ``model(**inputs)`` and return logits (a tensor, or a Hugging Face output's ``.logits``)."""
    out = model(**inputs)
    logits = out if torch.is_tensor(out) else getattr(out, "logits", None)
    if logits is None:
        raise TypeError(f"{type(model).__name__} returned {type(out).__name__}, not logits or an object with .logits")
    return logits


@dataclass
class TextAttackResult:
    """What a text attack found for a batch.

    Attributes:
        input_ids: ``[B, L]`` adversarial token ids (equal to the input where nothing changed).
        original_ids: ``[B, L]`` the clean ids.
        attention_mask: ``[B, L]``.
        changed: ``[B, L]`` bool, positions whose token was replaced.
        success: ``[B]`` bool, the adversarial tokens are misclassified (targeted: classified as the target).
            Samples that were already misclassified count as successes with no change.
        clean_correct: ``[B]`` bool, the clean input was classified correctly (untargeted) / not as the target.
        steps: ``[B]`` the step (1-based) at which the tokens fooled the model (with ``early_stop``: first
            fooled; without: the last step); 0 = already fooled, -1 = never.
        perturbation: ``[B, L, D]`` the final continuous embedding perturbation.
        text, original_text: decoded adversarial and clean texts (when a tokenizer was passed).
    """

    input_ids: torch.Tensor
    original_ids: torch.Tensor
    attention_mask: torch.Tensor
    changed: torch.Tensor
    success: torch.Tensor
    clean_correct: torch.Tensor
    steps: torch.Tensor
    perturbation: torch.Tensor
    text: list[str] | None = None
    original_text: list[str] | None = None

    @property
    def num_changed(self) -> torch.Tensor:
        """``[B]`` number of replaced tokens per sequence."""
        return self.changed.sum(1)

    def summary(self) -> dict[str, float]:
        """Attack success rate and words changed, over the samples the model got right.

        * ``success_rate``: fraction of clean-correct samples whose adversarial tokens fool the model;
        * ``words_changed``: mean replaced tokens per successful adversarial example;
        * ``fraction_changed``: the same, divided by the sequence length (non-padded tokens);
        * ``n``: number of clean-correct samples.
        """
        ok = self.clean_correct
        won = ok & self.success
        lengths = self.attention_mask.sum(1).clamp_min(1).float()
        n_won = int(won.sum())
        return {
            "n": float(ok.sum()),
            "success_rate": float(won.sum()) / max(int(ok.sum()), 1),
            "words_changed": float(self.num_changed[won].float().mean()) if n_won else float("nan"),
            "fraction_changed": float((self.num_changed[won] / lengths[won]).mean()) if n_won else float("nan"),
        }


@contextlib.contextmanager
def _no_cudnn(device: torch.device) -> Iterator[None]:
    # cuDNN's LSTM backward refuses to run in eval mode; attacks need input gradients in eval mode.
    if device.type == "cuda":
        with torch.backends.cudnn.flags(enabled=False):
            yield
    else:
        yield


class TextAttack(ABC):
    """Base of embedding-space text attacks: hyper-parameters here, the constraint set in subclasses.

    Each step: ``r <- P(r + alpha * s * g / ||g||_2)`` with ``g`` the gradient of the attack loss with respect
    to ``r`` (the whole sequence's L2 norm, as in Miyato et al. 2017), ``s`` the mean norm of the sequence's word
    embeddings (so ``alpha`` is scale-free across embedding tables) and ``P`` the subclass's projection.

    Args:
        steps: gradient steps (>= 1).
        alpha: step length, in units of the mean word-embedding norm of the sequence.
        loss: ``"ce"`` or ``"cw"`` (see :func:`~lightning_robust.attacks.attack_loss`).
        targeted: ``y`` holds target classes.
        model_mode: ``"eval"`` (default), ``"train"`` or ``"keep"``.
        random_start: start from a random perturbation of one step's length (projected), drawn from ``generator``.
        early_stop: round after every step and stop attacking a sample once its tokens fool the model; default
            ``False``: round only the final perturbation (see the module docstring: one rule for every attack).
        protected_ids: token ids never perturbed nor produced, added to the model's ``special_token_ids``.
    """

    def __init__(self, steps: int = 10, alpha: float = 0.25, loss: str = "ce", targeted: bool = False,
                 model_mode: str = "eval", random_start: bool = False, early_stop: bool = False,
                 protected_ids: Sequence[int] = ()) -> None:
        self.steps = check_positive_int("steps", steps)
        self.alpha = float(check_positive("alpha", alpha))
        self.loss = check_choice("loss", loss, LOSSES)
        self.targeted = bool(targeted)
        self.model_mode = check_choice("model_mode", model_mode, MODEL_MODES)
        self.random_start = bool(random_start)
        self.early_stop = bool(early_stop)
        ids = [int(i) for i in protected_ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"protected_ids must be non-negative token ids, got {list(protected_ids)!r}")
        self.protected_ids = tuple(sorted(set(ids)))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({inner})"

    # ---- to implement -------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, embeddings: torch.Tensor, input_ids: torch.Tensor, free: torch.Tensor,
                allowed: torch.Tensor, scale: torch.Tensor) -> dict[str, Any]:
        """Per-batch precomputation (neighbours, ...). ``free`` [B, L]: positions that may change;
        ``allowed`` [V]: tokens that may be produced; ``scale`` [B]: mean embedding norm per sequence."""

    @abstractmethod
    def project(self, r: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """Project the perturbation ``r`` [B, L, D] onto the constraint set (zero outside ``free``)."""

    def direction(self, g: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """The ascent direction [B, L, D] made of the loss gradient ``g`` (zero outside ``free``); the step
        normalises it over the whole sequence. Default: the gradient itself."""
        return g

    def round(self, r: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """The discretisation rule shared by every attack: each free word becomes the allowed token whose
        embedding is nearest (Euclidean) to ``E[x_t] + r_t`` (the original on ties); returns ids [B, L]."""
        free, ids, E = ctx["free"], ctx["input_ids"], ctx["E"]
        out = ids.clone()
        if not bool(free.any()):
            return out
        from lightning_robust.attacks.spgd import nearest_other_distance, nearest_tokens

        rf = r[free]
        # A word whose perturbation is shorter than half the distance to its nearest other allowed token is
        # strictly nearer to itself than to any token: only the others need the vocabulary-wide search.
        if "nn_dist" not in ctx:  # computed on first rounding only (adversarial training never rounds)
            ctx["nn_dist"] = nearest_other_distance(E, ids[free], ctx["allowed"])
        may = rf.norm(dim=1) >= ctx["nn_dist"] / 2 - 1e-6
        if bool(may.any()):
            orig = ids[free]
            new = orig.clone()
            new[may] = nearest_tokens(E[orig[may]] + rf[may], E, orig[may], ctx["allowed"])
            out[free] = new
        return out

    # ---- the loop -----------------------------------------------------------------------------------
    def validate(self, model: nn.Module, input_ids: torch.Tensor, y: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> nn.Embedding:
        """Check the inputs and return the model's input-embedding table."""
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"{type(model).__name__} must expose get_input_embeddings() -> nn.Embedding "
                            "and accept inputs_embeds= (see lightning_robust.nets.text)")
        if not torch.is_tensor(input_ids) or input_ids.dtype != torch.long or input_ids.ndim != 2:
            raise TypeError("input_ids must be a [batch, length] LongTensor of token ids")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= emb.num_embeddings):
            raise ValueError(f"input_ids must lie in [0, {emb.num_embeddings}) (the embedding table's size), got "
                             f"values in [{int(input_ids.min())}, {int(input_ids.max())}]")
        if not torch.is_tensor(y) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError("y must be an integer tensor of class labels")
        if y.ndim != 1 or y.shape[0] != input_ids.shape[0]:
            raise ValueError(f"y must have shape [{input_ids.shape[0]}] (one label per sequence), got {tuple(y.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        return emb

    def _setup(self, model: nn.Module, emb: nn.Embedding, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        E = emb.weight.detach()
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.detach().clone()).long()
        protected = set(self.protected_ids) | {int(i) for i in getattr(model, "special_token_ids", ())}
        pad = getattr(emb, "padding_idx", None)
        if pad is not None:
            protected.add(int(pad))
        allowed = torch.ones(E.shape[0], dtype=torch.bool, device=E.device)
        ids = torch.tensor(sorted(i for i in protected if i < E.shape[0]), dtype=torch.long, device=E.device)
        allowed[ids] = False
        free = mask.bool() & allowed[input_ids]
        e0 = E[input_ids]
        norms = e0.norm(dim=-1) * free
        scale = norms.sum(1) / free.sum(1).clamp_min(1)
        ctx = self.prepare(E, input_ids, free, allowed, scale)
        ctx.update(E=E, input_ids=input_ids, free=free, allowed=allowed, scale=scale)
        return e0, mask, free, ctx

    def _step(self, model: nn.Module, e0: torch.Tensor, r: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,
              free: torch.Tensor, scale: torch.Tensor, active: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        r = r.detach().requires_grad_(True)
        logits = model_logits(model, inputs_embeds=e0 + r, attention_mask=mask)
        loss = attack_loss(logits, y, self.loss, self.targeted)
        (g,) = torch.autograd.grad(loss.sum(), r)
        g = self.direction(g * free.unsqueeze(-1), ctx) * free.unsqueeze(-1)
        gnorm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
        step = (self.alpha * scale / gnorm * active).view(-1, 1, 1)
        return self.project(r.detach() + step * g, ctx)

    def _start(self, e0: torch.Tensor, free: torch.Tensor, scale: torch.Tensor, ctx: dict[str, Any],
               generator: torch.Generator | None) -> torch.Tensor:
        if not self.random_start:
            return torch.zeros_like(e0)
        z = torch.randn(e0.shape, generator=generator, device="cpu", dtype=e0.dtype).to(e0.device)
        z = z * free.unsqueeze(-1)
        z = z / z.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
        return self.project(z * (self.alpha * scale).view(-1, 1, 1), ctx)

    def embedding_perturbation(self, model: nn.Module, input_ids: torch.Tensor, y: torch.Tensor,
                               attention_mask: torch.Tensor | None = None, *,
                               generator: torch.Generator | None = None,
                               model_mode: str | None = None) -> torch.Tensor:
        """The continuous perturbation ``r`` [B, L, D] after ``steps`` projected steps (no rounding, no early
        stop): train on ``model(inputs_embeds=E[input_ids] + r)`` for embedding-space adversarial training.
        ``model_mode`` (default: the attack's own) sets the mode the gradients are taken in."""
        emb = self.validate(model, input_ids, y, attention_mask)
        mode = self.model_mode if model_mode is None else check_choice("model_mode", model_mode, MODEL_MODES)
        with (torch.inference_mode(False), torch.enable_grad(), model_mode_ctx(model, mode),
              _no_cudnn(input_ids.device)):
            input_ids, y = input_ids.clone(), y.clone().long()
            e0, mask, free, ctx = self._setup(model, emb, input_ids, attention_mask)
            active = torch.ones(input_ids.shape[0], dtype=e0.dtype, device=e0.device)
            r = self._start(e0, free, ctx["scale"], ctx, generator)
            for _ in range(self.steps):
                r = self._step(model, e0, r, mask, y, free, ctx["scale"], active, ctx)
        return r.detach()

    def __call__(self, model: nn.Module, input_ids: torch.Tensor, y: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
                 tokenizer: _Decoder | None = None) -> TextAttackResult:
        """Attack ``(input_ids, y)``; see the module docstring."""
        emb = self.validate(model, input_ids, y, attention_mask)
        with (torch.inference_mode(False), torch.enable_grad(), model_mode(model, self.model_mode),
              _no_cudnn(input_ids.device)):
            input_ids, y = input_ids.clone(), y.clone().long()
            e0, mask, free, ctx = self._setup(model, emb, input_ids, attention_mask)
            B = input_ids.shape[0]
            with torch.no_grad():
                clean = model_logits(model, input_ids=input_ids, attention_mask=mask)
            fooled = self._fooled(clean, y)
            best = input_ids.clone()
            steps_taken = torch.full((B,), -1, dtype=torch.long, device=input_ids.device)
            steps_taken[fooled] = 0
            success = fooled.clone()
            active = ~fooled
            r = self._start(e0, free, ctx["scale"], ctx, generator)
            for step in range(1, self.steps + 1):
                if not bool(active.any()):
                    break
                r = self._step(model, e0, r, mask, y, free, ctx["scale"], active.to(e0.dtype), ctx)
                if self.early_stop:
                    cand = self.round(r, ctx)
                    with torch.no_grad():
                        won = self._fooled(model_logits(model, input_ids=cand, attention_mask=mask), y) & active
                    best[won] = cand[won]
                    steps_taken[won] = step
                    success |= won
                    active &= ~won
            # The final perturbation's tokens: the result without early stopping, and the last attempt (marked
            # unsuccessful) of the samples never fooled with it.
            last = self.round(r, ctx)
            if not self.early_stop:
                with torch.no_grad():
                    won = self._fooled(model_logits(model, input_ids=last, attention_mask=mask), y) & active
                steps_taken[won] = self.steps
                success |= won
            never = ~success
            best[never] = last[never]
            if not self.early_stop:
                best[won] = last[won]
        changed = (best != input_ids) & mask.bool()
        result = TextAttackResult(input_ids=best.detach(), original_ids=input_ids, attention_mask=mask,
                                  changed=changed, success=success, clean_correct=~fooled, steps=steps_taken,
                                  perturbation=r.detach())
        if tokenizer is not None:
            result.text = [tokenizer.decode(row[m.bool()].tolist()) for row, m in zip(best, mask)]
            result.original_text = [tokenizer.decode(row[m.bool()].tolist()) for row, m in zip(input_ids, mask)]
        return result

    def _fooled(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pred = logits.argmax(1)
        return pred == y if self.targeted else pred != y
