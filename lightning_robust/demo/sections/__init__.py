"""The demo's sections, run in this order. Each is ``run(ctx: DemoContext, report: Report) -> None``.

To add a method to the tour, write ``sections/<method>.py`` with a ``run`` function and list it here.
Sections that need an optional extra (e.g. ``text``) should check for it and add a note instead.
"""

from collections.abc import Callable

from lightning_robust.demo.context import DemoContext
from lightning_robust.demo.report import Report
from lightning_robust.demo.sections import (
    ard,
    attacks,
    certification,
    classifier,
    entropic_gan,
    gan_distillation,
    interpretation,
    normalized_wasserstein,
    poison_filter,
    text_spgd,
)

SectionFn = Callable[[DemoContext, Report], None]

SECTIONS: list[tuple[str, str, SectionFn]] = [
    # The classifier comes first: later sections reuse its trained digits model (ctx.artifacts).
    ("classifier", "Classifier on the bundled digits", classifier.run),
    ("attacks", "Adversarial attacks and adversarial training", attacks.run),
    ("ard", "Adversarially Robust Distillation", ard.run),
    ("poison_filter", "Deep k-NN poison filter", poison_filter.run),
    ("interpretation", "Interpretation: certified SmoothGrad and second-order explanations", interpretation.run),
    ("certification", "Robustness certificates for ReLU networks", certification.run),
    ("gan_distillation", "GAN compression by distillation", gan_distillation.run),
    ("normalized_wasserstein", "Normalized Wasserstein: NW-GAN learns mixture proportions", normalized_wasserstein.run),
    ("entropic_gan", "Entropic GAN and per-sample likelihoods", entropic_gan.run),
    ("text_spgd", text_spgd.TITLE, text_spgd.run),
]

__all__ = ["SECTIONS", "SectionFn"]
