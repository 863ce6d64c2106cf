"""Import direction and safety rules of DESIGN.md, checked over the source tree."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lightning_robust"
PURE = ("nets", "attacks", "defenses", "interpret", "certify", "ot", "objectives")


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_pure_packages_never_import_lightning():
    for sub in PURE:
        for f in (PKG / sub).rglob("*.py"):
            bad = {m for m in _imports(f) if m.split(".")[0] in ("pytorch_lightning", "lightning", "torchmetrics")
                   or m.startswith(("lightning_robust.models", "lightning_robust.callbacks",
                                    "lightning_robust.metrics", "lightning_robust.datamodules"))}
            assert not bad, f"{f.relative_to(PKG)} imports {sorted(bad)}"


def test_callbacks_never_import_models_and_no_lightning_package():
    for f in PKG.rglob("*.py"):
        mods = _imports(f)
        assert not any(m == "lightning" or m.startswith("lightning.") for m in mods), f
        if "callbacks" in f.parts:
            assert not any(m.startswith("lightning_robust.models") for m in mods), f


def test_no_unsafe_load_no_bare_except_no_unfiltered_extract():
    for f in list(PKG.rglob("*.py")) + list((PKG.parent / "benchmarks").rglob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler):
                assert node.type is not None, f"bare except in {f}:{node.lineno}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                kw = {k.arg: k.value for k in node.keywords}
                if node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch":
                    val = kw.get("weights_only")
                    assert isinstance(val, ast.Constant) and val.value is True, f"torch.load in {f}:{node.lineno}"
                if node.func.attr == "extractall":
                    assert "filter" in kw, f"extractall without filter in {f}:{node.lineno}"


def test_public_names_sorted_all():
    import importlib

    for sub in ("nets", "utils", "datamodules", "models", "callbacks", "attacks", "defenses", "interpret",
                "certify", "ot", "metrics", "objectives"):
        mod = importlib.import_module(f"lightning_robust.{sub}")
        names = list(mod.__all__)
        assert names == sorted(names), f"lightning_robust.{sub}.__all__ is not sorted"
        for n in names:
            assert hasattr(mod, n), f"lightning_robust.{sub} does not define {n}"
