"""A Markdown report with PNG figures (matplotlib), written section by section."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lightning_robust.utils.plotting import save_figure

__all__ = ["Report", "Section"]


@dataclass
class Section:
    """One part of the report: a title, paragraphs, tables and figures, in the order added."""

    title: str
    blocks: list[str] = field(default_factory=list)


class Report:
    """Collects sections and writes ``report.md`` plus its figures into ``out_dir``.

    Example:
        >>> report = Report("runs/demo", "lightning_robust demo")
        >>> sec = report.section("Classifier")
        >>> report.text(sec, "Trained a SmallCNN.")
        >>> report.table(sec, ["metric", "value"], [["test accuracy", "0.97"]])
        >>> report.figure(sec, "predictions", image_grid(x), "Predictions on test digits (red = wrong).")
        >>> report.write()
    """

    def __init__(self, out_dir: str | Path, title: str) -> None:
        self.out_dir = Path(out_dir)
        self.fig_dir = self.out_dir / "figures"
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.preamble: list[str] = []
        self.sections: list[Section] = []

    def section(self, title: str) -> Section:
        sec = Section(title)
        self.sections.append(sec)
        return sec

    def text(self, sec: Section, text: str) -> None:
        sec.blocks.append(text.strip())

    def table(self, sec: Section, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        def cell(v: Any) -> str:
            return f"{v:.4g}" if isinstance(v, float) else str(v)

        lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        sec.blocks.append("\n".join(lines))

    def figure(self, sec: Section, name: str, figure: Figure, caption: str) -> Path:
        path = save_figure(figure, self.fig_dir / f"{name}.png")
        sec.blocks.append(f"![{caption}](figures/{path.name})\n\n*{caption}*")
        return path

    def write(self) -> Path:
        parts = [f"# {self.title}", *self.preamble]
        if len(self.sections) > 1:
            parts.append("\n".join(f"- [{s.title}](#{_anchor(s.title)})" for s in self.sections))
        for s in self.sections:
            parts.append(f"## {s.title}\n\n" + "\n\n".join(s.blocks))
        path = self.out_dir / "report.md"
        path.write_text("\n\n".join(parts) + "\n")
        return path


def _anchor(title: str) -> str:
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -")
    return keep.replace(" ", "-")
