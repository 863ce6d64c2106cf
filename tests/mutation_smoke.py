"""Mutation smoke: plant one documented bug at a time in a copy of the package and run the tests meant to catch it.

Not collected by pytest (the file name has no ``test_`` prefix) and not part of ``make test``. Run it by hand:

    python tests/mutation_smoke.py [--only ID ...]

For every mutant below, the package and the tests are copied to a temporary folder, the mutant's ``old`` text is
replaced by its ``new`` text (it must occur exactly once), and the listed tests run there with ``pytest -x``
(the copy comes first on ``sys.path``, so ``import lightning_robust`` is the mutated one; tests marked ``ddp``
are left out). A mutant is *caught* when those tests fail. The same tests are first run once on the unmutated
copy, which must pass, so that a "caught" never comes from a test that was failing anyway. The result is a
Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    id: str
    paper: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS: tuple[Mutant, ...] = (
    Mutant("knn-self", "Deep k-NN 1909.13374", "a point counts itself among its k neighbours",
           "lightning_robust/defenses/deep_knn.py",
           'dist[own - lo, own] = float("inf")', 'dist[own - lo, own] = dist[own - lo, own]',
           ("tests/defenses/test_deep_knn.py",)),
    Mutant("knn-farthest", "Deep k-NN 1909.13374", "the vote uses the farthest instead of the nearest points",
           "lightning_robust/defenses/deep_knn.py",
           "vals, idx = dist.topk(k_more, dim=1, largest=False, sorted=False)",
           "vals, idx = dist.topk(k_more, dim=1, largest=True, sorted=False)",
           ("tests/defenses/test_deep_knn.py",)),
    Mutant("pgd-linf-projection", "PGD (ThreatModel)", "L-inf PGD forgets the lower face of the eps-box",
           "lightning_robust/attacks/pgd.py",
           "x_adv = torch.minimum(torch.maximum(x_adv.detach().add_(grad.sign_(), alpha=self.alpha), lo), hi)",
           "x_adv = torch.minimum(x_adv.detach().add_(grad.sign_(), alpha=self.alpha), hi)",
           ("tests/attacks/test_pgd.py",)),
    Mutant("recolor-box", "ReColorAdv 1906.00001", "colour-grid offsets are not projected onto their bounds",
           "lightning_robust/attacks/recoloradv.py",
           "return torch.minimum(torch.maximum(params, lower), upper)", "return params",
           ("tests/attacks/test_functional_base.py", "tests/attacks/test_contract.py")),
    Mutant("spgd-segment", "SPGD 1905.12864", "the projection may overshoot the neighbour (no cap at its distance)",
           "lightning_robust/attacks/spgd.py",
           "s = a.clamp_min(0.0) if distances is None else torch.minimum(a.clamp_min(0.0), distances)",
           "s = a.clamp_min(0.0)",
           ("tests/attacks/test_spgd.py",)),
    Mutant("smoothgrad-cert-shift", "Sparsified SmoothGrad 1905.12105", "certificate uses r/sigma instead of 2r/sigma",
           "lightning_robust/interpret/saliency.py",
           "shift = 2.0 * float(r) / sigma", "shift = float(r) / sigma",
           ("tests/interpret/test_saliency.py",)),
    Mutant("sparsify-smallest", "Sparsified SmoothGrad 1905.12105", "sparsification keeps the smallest |g|",
           "lightning_robust/interpret/saliency.py",
           "out.scatter_(1, a.topk(k, dim=1).indices, 1.0)",
           "out.scatter_(1, a.topk(k, dim=1, largest=False).indices, 1.0)",
           ("tests/interpret/test_saliency.py",)),
    Mutant("interp-penalty-abs", "Interpretation regularization 1905.12105", "penalty compares signed maps (no |.|)",
           "lightning_robust/objectives/saliency_consistency.py",
           "return (_unit(g_natural.abs()) - _unit(g_perturbed.abs())).pow(2).mean(1)",
           "return (_unit(g_natural) - _unit(g_perturbed)).pow(2).mean(1)",
           ("tests/models/test_interpretation.py",)),
    Mutant("ard-no-tau2", "ARD 1905.09747", "the distillation term loses its tau^2 factor",
           "lightning_robust/objectives/distillation.py",
           "    return temperature**2 * kl", "    return kl",
           ("tests/models/test_ard.py",)),
    Mutant("hessian-no-pp", "Second-order interpretation 1902.00407", "H = J^T diag(p) J (drops -p p^T)",
           "lightning_robust/interpret/second_order.py",
           "    p = logits.double().log_softmax(1).exp()\n",
           "    p = logits.double().log_softmax(1).exp()\n    return p, torch.diag_embed(p)\n",
           ("tests/interpret/test_second_order.py",)),
    Mutant("simplex-hinge-farthest", "Simplex certificate training 1902.01235", "the hinge pushes the farthest facets",
           "lightning_robust/certify/certificates.py",
           "near = dist.topk(min(topk, dist.shape[1]), dim=1, largest=False).values",
           "near = dist.topk(min(topk, dist.shape[1]), dim=1, largest=True).values",
           ("tests/models/test_classifier_certificate.py", "tests/certify/test_certificates.py")),
    Mutant("fast-at-clean", "Fast adversarial training (Wong et al.)", "training_loss drops the adversarial examples",
           "lightning_robust/objectives/adversarial.py",
           "            batch.inputs = self.train_attack(module, batch.inputs, batch.y, generator=batch.generator)\n",
           "            self.train_attack(module, batch.inputs, batch.y, generator=batch.generator)\n",
           ("tests/models/test_adversarial_training.py::test_fast_training_loss_is_cross_entropy_on_fgsm_random_"
            "start_examples",
            "tests/models/test_adversarial_training.py::test_fast_mode_is_fgsm_with_random_start_and_trains")),
    Mutant("nw-sign", "Normalized Wasserstein 1902.00415", "NW dual with the mixture term added, not subtracted",
           "lightning_robust/ot/normalized_wasserstein.py",
           "return t[:, 0].mean() - mixture_expectation(component_scores, proportions, labels)",
           "return t[:, 0].mean() + mixture_expectation(component_scores, proportions, labels)",
           ("tests/ot/test_normalized_wasserstein.py",)),
    Mutant("sinkhorn-stop", "Sinkhorn (NW / entropic OT)", "the stopping rule accepts the first check",
           "lightning_robust/ot/sinkhorn.py",
           "done = max(self.bound, step) <= self.tol and row_err <= self.tol",
           "done = True",
           ("tests/ot/test_sinkhorn.py",)),
    Mutant("gan-distill-l1", "GAN compression 1902.00159", "distillation loss is L1 instead of the paper's MSE",
           "lightning_robust/models/distilled_gan.py",
           "return F.mse_loss(student_out, teacher_out.detach())",
           "return F.l1_loss(student_out, teacher_out.detach())",
           ("tests/models/test_distilled_gan.py",)),
    Mutant("ema-swap", "GAN generators' EMA", "theta_ema <- (1 - d) theta_ema + d theta",
           "lightning_robust/models/gan.py",
           "p_ema.lerp_(p.detach(), 1.0 - self.ema_decay)", "p_ema.lerp_(p.detach(), self.ema_decay)",
           ("tests/models/test_gan.py",)),
    Mutant("entropic-likelihood-norm", "Entropic GAN 1810.04147", "likelihood forgets the -log n normalization",
           "lightning_robust/ot/likelihood.py",
           "ll = ll - math.log(n) + cost_log_normalizer(cost, dim, reg)",
           "ll = ll + cost_log_normalizer(cost, dim, reg)",
           ("tests/ot/test_likelihood.py",)),
)


def _copy(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("lightning_robust", "tests", "configs", "benchmarks"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    # tests/conftest.py finds ../shared/data beside the checkout; point it at the real one.
    os.environ.setdefault("LIGHTNING_ROBUST_SHARED_DATA", str(REPO.parent / "shared" / "data"))


def _pytest(root: Path, tests: tuple[str, ...]) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    start = time.perf_counter()
    # DDP tests check rank agreement, not these computations, and cost ~8 s a process: left out here.
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not ddp", *tests]
    proc = subprocess.run(cmd,
                          cwd=root, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, time.perf_counter() - start, lines[-1] if lines else proc.stderr[-200:]


def _check_resolves_to_copy(root: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", "import lightning_robust; print(lightning_robust.__file__)"],
                         cwd=root, env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not out.startswith(str(root)):
        raise SystemExit(f"the copy is not the package that gets imported ({out}); aborting")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutation_smoke_") as tmp:
        base = Path(tmp) / "base"
        _copy(base)
        _check_resolves_to_copy(base)
        baseline: dict[tuple[str, ...], int] = {}
        for m in mutants:
            if m.tests not in baseline:
                rc, seconds, summary = _pytest(base, m.tests)
                baseline[m.tests] = rc
                print(f"baseline {' '.join(m.tests)}: rc={rc} ({seconds:.0f} s) {summary}", file=sys.stderr)
        for m in mutants:
            root = Path(tmp) / m.id
            _copy(root)
            target = root / m.path
            text = target.read_text()
            if text.count(m.old) != 1:
                rows.append((m, "mutant does not apply (code changed?)", 0.0, ""))
                continue
            target.write_text(text.replace(m.old, m.new))
            if baseline[m.tests] != 0:
                rows.append((m, "n/a: tests fail unmutated", 0.0, ""))
                continue
            rc, seconds, summary = _pytest(root, m.tests)
            verdict = "caught" if rc == 1 else ("SURVIVED" if rc == 0 else f"error rc={rc}")
            rows.append((m, verdict, seconds, summary))
            print(f"{m.id}: {verdict} ({seconds:.0f} s) {summary}", file=sys.stderr)
            shutil.rmtree(root)
    print("| mutant | paper / part | planted bug | tests run | result | time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m, verdict, seconds, summary in rows:
        tests = ", ".join(f"`{t.split('::')[0].removeprefix('tests/')}`" for t in m.tests)
        detail = f"{verdict} ({summary})" if summary else verdict
        what = m.what.replace("|", "\\|")  # a literal | would split the Markdown cell
        print(f"| `{m.id}` | {m.paper} | {what} | {tests} | {detail} | {seconds:.0f} s |")
    caught = sum(v == "caught" for _, v, _, _ in rows)
    print(f"\n{caught} of {len(rows)} mutants caught.")


if __name__ == "__main__":
    main()
