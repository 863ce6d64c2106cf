"""AutoAttack (Croce & Hein 2020, arXiv 2003.01690) as an evaluation preset, on torchattacks' implementation.

The standard version runs APGD-CE, APGD-T (targeted, DLR loss, 9 target classes), FAB-T and Square
(5000 queries) one after the other, each only on the inputs the previous ones did not break; robust
accuracy is the fraction still classified correctly, ``min`` over the ensemble per input. It is the
reference evaluation of RobustBench.

torchattacks pins an old ``requests``; install it without its dependencies so the others stay intact::

    pip install --no-deps torchattacks        # or: pip install "lightning-robust[autoattack]" --no-deps
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_robust.attacks.base import Attack
from lightning_robust.attacks.foreign import check_adversarial_output
from lightning_robust.attacks.threat import ThreatModel
from lightning_robust.utils.validation import check_choice, check_positive_int, check_seed

__all__ = ["AUTOATTACK_INSTALL", "AutoAttack", "import_torchattacks"]

AUTOATTACK_INSTALL = "pip install --no-deps torchattacks"


def import_torchattacks() -> Any:
    """Import torchattacks, or raise an ImportError that names the one install command."""
    try:
        import torchattacks
    except ImportError as err:
        raise ImportError(f"AutoAttack needs torchattacks; install it with `{AUTOATTACK_INSTALL}` (--no-deps keeps "
                          "its old pinned `requests` from replacing yours)") from err
    return torchattacks


class AutoAttack(Attack):
    """AutoAttack, standard version: APGD-CE, APGD-T, FAB-T, Square (Croce & Hein 2020, arXiv 2003.01690).

    The four attacks are torchattacks' implementations, configured as in the authors' ``standard`` version
    (fra31/auto-attack): APGD-CE with 100 iterations, APGD-T (DLR loss) and FAB-T with 100 iterations
    against each of the ``n_classes - 1`` most likely other classes, Square with 5000 queries, one restart
    each. (torchattacks' own ``AutoAttack`` preset keeps its components' default 10 iterations, which is
    weaker than PGD-20 on small nets; hence the ensemble is assembled here.) Each attack runs only on the
    inputs that the previous ones left correctly classified, so an input counts as robust only if no
    component breaks it.

    Holds hyper-parameters only, like every attack here: the components are built for the model of each
    call. Every component's output passes the honesty checks of a foreign attack (shape, dtype, finite,
    inside the ``eps`` ball and [0, 1]).

    Args:
        eps: radius of the threat model, in [0, 1] pixel units.
        norm: ``"linf"`` or ``"l2"`` (the norms of the standard version).
        n_classes: number of classes (default: read from the model's output on the batch).
        n_iter: iterations of APGD-CE, APGD-T and FAB-T (100 in the standard version).
        n_queries: queries of Square (5000 in the standard version).
        seed: seed of the random starts when the call passes no ``generator``.

    Raises:
        ValueError: on a bad eps, norm, count or seed.
        ImportError: at call time when torchattacks is missing, naming ``pip install --no-deps torchattacks``.

    Example:
        >>> callback = RobustnessEvaluation({"autoattack": AutoAttack(eps=8 / 255)}, max_batches=10)
        >>> x_adv = AutoAttack(eps=0.1)(model, x, y)
    """

    def __init__(self, eps: float = 8 / 255, norm: str = "linf", n_classes: int | None = None, n_iter: int = 100,
                 n_queries: int = 5000, seed: int = 0) -> None:
        check_choice("norm", norm, ("linf", "l2"))
        super().__init__(ThreatModel(norm, eps))
        if n_classes is not None:
            check_positive_int("n_classes", n_classes, minimum=2)
        self.n_classes = n_classes
        self.n_iter = check_positive_int("n_iter", n_iter)
        self.n_queries = check_positive_int("n_queries", n_queries)
        self.seed = check_seed("seed", seed)

    def components(self, model: nn.Module, n_classes: int, seed: int) -> list[tuple[str, Any]]:
        """The four torchattacks objects of the standard version, bound to ``model``."""
        ta = import_torchattacks()
        kw: dict[str, Any] = dict(norm="Linf" if self.norm == "linf" else "L2", eps=self.eps, seed=seed)
        return [
            ("apgd-ce", ta.APGD(model, steps=self.n_iter, n_restarts=1, loss="ce", **kw)),
            ("apgd-t", ta.APGDT(model, steps=self.n_iter, n_restarts=1, n_classes=n_classes, **kw)),
            ("fab-t", ta.FAB(model, steps=self.n_iter, n_restarts=1, multi_targeted=True, n_classes=n_classes, **kw)),
            ("square", ta.Square(model, n_queries=self.n_queries, n_restarts=1, **kw)),
        ]

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        import_torchattacks()  # fail before any work when it is missing
        with torch.no_grad():
            correct = model(x).argmax(1) == y
            n_classes = self.n_classes or int(model(x[:1]).shape[1])
        seed = self.seed
        if generator is not None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        x_adv = x.clone()
        grads = [(p, p.grad) for p in model.parameters()]
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            # torchattacks' APGD re-seeds the global RNG: fork it so the caller's stream is untouched.
            with torch.random.fork_rng(devices=devices):
                for name, attack in self.components(model, n_classes, seed):
                    idx = correct.nonzero().flatten()
                    if idx.numel() == 0:
                        break
                    attack.set_device(x.device)
                    out = attack(x[idx], y[idx]).detach()
                    check_adversarial_output(out, x[idx], self.threat, 1e-5, name=f"AutoAttack component {name!r}")
                    with torch.no_grad():
                        broken = model(out).argmax(1) != y[idx]
                    x_adv[idx[broken]] = out[broken]
                    correct[idx[broken]] = False
        finally:
            for p, g in grads:
                p.grad = g
        return x_adv
