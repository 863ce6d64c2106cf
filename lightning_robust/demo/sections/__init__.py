"""The demo's sections, run in this order. Each is ``run(ctx: DemoContext, report: Report) -> None``.

To add a method to the tour, write ``sections/<method>.py`` with a ``run`` function and list it here.
Sections that need an optional extra (e.g. ``text``) should check for it and add a note instead.
"""

from collections.abc import Callable

from lightning_robust.demo.context import DemoContext
from lightning_robust.demo.report import Report
from lightning_robust.demo.sections import ard, attacks, classifier

SectionFn = Callable[[DemoContext, Report], None]

SECTIONS: list[tuple[str, str, SectionFn]] = [
    ("classifier", "Classifier on the bundled digits", classifier.run),
    ("attacks", "Adversarial attacks and adversarial training", attacks.run),
    ("ard", "Adversarially Robust Distillation", ard.run),
]

__all__ = ["SECTIONS", "SectionFn"]
