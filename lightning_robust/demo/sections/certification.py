"""Demo section: simplex and decision-boundary certificates (Singla & Feizi, arXiv 1902.01235) on the digits."""

from __future__ import annotations

import time
from functools import partial

import torch

from lightning_robust.attacks import PGD
from lightning_robust.certify import certify, lipschitz_bound
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.demo.context import DemoContext
from lightning_robust.demo.report import Report
from lightning_robust.metrics import certified_accuracy
from lightning_robust.models import Classifier
from lightning_robust.nets import MLP, SmallCNN
from lightning_robust.utils.plotting import histogram, line_plot

METHODS = {"simplex": "simplex", "decision_boundary": "decision boundary", "lipschitz": "global Lipschitz"}


def _test_tensors(dm: DigitsDataModule, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(b[0], b[1]) for b in dm.test_dataloader()])
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _certify_all(net: torch.nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    lb = lipschitz_bound(net, tuple(x.shape[1:]))
    radii, ms = {}, {}
    for method in METHODS:
        t0 = time.perf_counter()
        radii[method] = certify(net, x, method=method, lipschitz=lb).detach()
        ms[method] = (time.perf_counter() - t0) / len(x) * 1e3
    return radii, ms


def run(ctx: DemoContext, report: Report) -> None:
    """Certify the digits classifier, plot certified accuracy against radius, and train a certified MLP."""
    ctx.seed_everything()
    sec = report.section("Robustness certificates for ReLU networks (simplex / decision boundary)")
    dm = ctx.artifacts.get("digits_datamodule")
    model = ctx.artifacts.get("digits_classifier")
    if model is None or dm is None:  # run on its own (``--only certification``): a quick classifier
        dm = DigitsDataModule(batch_size=64, image_size=8, seed=ctx.seed)
        model = Classifier(SmallCNN(in_channels=1, num_classes=10, input_size=8),
                           optimizer=partial(torch.optim.Adam, lr=2e-3))
        ctx.trainer("certification_classifier", max_epochs=3 if ctx.fast else 10).fit(model, datamodule=dm)
    dm.setup()
    net = model.net.eval()
    n = 32 if ctx.fast else 100
    x, y = _test_tensors(dm, n)
    with torch.no_grad():
        pred = net(x).argmax(1)
    correct = pred == y
    radii, ms = _certify_all(net, x)

    grid = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for method, r in radii.items():
        curves[f"SmallCNN, certified: {METHODS[method]}"] = (grid, certified_accuracy(r, correct, grid).tolist())
    # Empirical robust accuracy under PGD-L2 (an upper bound on what any certificate can achieve).
    emp = []
    for eps in grid:
        if eps == 0:
            emp.append(float(correct.float().mean()))
            continue
        attack = PGD(eps=eps, steps=10 if ctx.fast else 20, norm="l2", loss="cw")
        x_adv = attack(net, x, y, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            emp.append(float((net(x_adv).argmax(1) == y).float().mean()))
    curves["SmallCNN: PGD-L2 robust accuracy (upper bound)"] = (grid, emp)

    report.text(sec, (
        "The digits classifier (a SmallCNN with max pooling) is piecewise linear: around every input its "
        "activation pattern (ReLU signs, max-pooling winners) fixes a polyhedron on which the network is "
        "one affine map (`lightning_robust.certify.local_affine_map`, exact to float rounding). The "
        "**simplex certificate** is the radius of the largest L2 ball around the input inside that polyhedron "
        "and on the right side of every linearized decision boundary (closed form, differentiable); the "
        "**decision-boundary certificate** also follows paths that leave the polyhedron, bounding the "
        "margin's fall outside it with the network's global Lipschitz constant. Both are sound: no input "
        f"closer than the radius changes the prediction. {n} test digits, pixel values in [0, 1] (an 8x8 "
        "image has L2 diameter 8)."
    ))
    rows = []
    for method, r in radii.items():
        acc = certified_accuracy(r, correct, (0.1, 0.25, 0.5)).tolist()
        rows.append([METHODS[method], float(r.mean()), float(r.median()), *acc, f"{ms[method]:.2f}"])
    report.table(sec, ["certificate", "mean radius", "median radius", "certified acc @0.1", "@0.25", "@0.5",
                       "ms / sample"], rows)
    report.figure(sec, "certification_radii_histogram",
                  histogram({METHODS[m]: radii[m] for m in ("simplex", "decision_boundary")}, bins=30,
                            title="Certified L2 radii (digits SmallCNN)", xlabel="certified radius"),
                  "Distribution of the two certificates over the test digits.")

    # Certified training: the simplex certificate is differentiable, so a loss can enlarge it.
    epochs = 3 if ctx.fast else 10
    results = []
    hist: dict[str, torch.Tensor] = {}
    for label, weight in (("cross-entropy", 0.0), ("cross-entropy + simplex hinge", 1.0)):
        ctx.seed_everything()
        mlp = Classifier(MLP(64, 10, (64, 64)), certificate_weight=weight, certificate_radius=1.0,
                         optimizer=partial(torch.optim.Adam, lr=1e-3))
        ctx.trainer(f"certification_mlp_{int(weight)}", max_epochs=epochs).fit(mlp, datamodule=dm)
        m = mlp.net.eval()
        r_s = certify(m, x, method="simplex").detach()
        r_d = certify(m, x, method="decision_boundary").detach()
        with torch.no_grad():
            ok = m(x).argmax(1) == y
        hist[f"{label}: simplex"] = r_s
        curves[f"MLP, {label}: decision boundary"] = (grid, certified_accuracy(r_d, ok, grid).tolist())
        acc = certified_accuracy(r_d, ok, (0.0, 0.25, 0.5)).tolist()
        results.append([label, acc[0], float(r_s.mean()), float(r_d.mean()), acc[1], acc[2]])
    report.text(sec, (
        f"Certified training: a 64-64-64-10 ReLU MLP trained for {epochs} epochs with plain cross-entropy, "
        "and with `Classifier(certificate_weight=1.0, certificate_method='simplex', certificate_radius=1.0)` "
        "(hinges on the nearest facets of the certified polyhedron and on the distance to the linearized "
        "boundary, `lightning_robust.certify.simplex_hinge_loss`)."
    ))
    report.table(sec, ["training", "clean acc", "mean simplex radius", "mean decision-boundary radius",
                       "certified acc @0.25 (decision boundary)", "@0.5"], results)
    report.figure(sec, "certification_accuracy_vs_radius",
                  line_plot(curves, title="Certified accuracy vs L2 radius (digits)", xlabel="L2 radius",
                            ylabel="accuracy", ylim=(0.0, 1.0)),
                  "Fraction of test digits classified correctly with a certificate beyond each radius: the "
                  "SmallCNN classifier's three certificates and its PGD-L2 robust accuracy (empirical, an upper "
                  "bound on any certified accuracy), and the decision-boundary certificates of the plain and "
                  "the certificate-trained MLP. The SmallCNN's certificates all end near radius 0 on this scale "
                  "(its curves lie on top of each other); the next figure zooms in on them.")
    r_max = max(float(r.max()) for r in radii.values()) or 1e-3
    fine = [r_max * i / 20 for i in range(21)]
    zoom = {METHODS[m]: (fine, certified_accuracy(r, correct, fine).tolist()) for m, r in radii.items()}
    report.figure(sec, "certification_smallcnn_zoom",
                  line_plot(zoom, title=f"SmallCNN certified accuracy, radius 0 to {r_max:.3g}",
                            xlabel="L2 radius", ylabel="accuracy", ylim=(0.0, 1.0)),
                  "The SmallCNN's three certificates on a radius axis scaled to the largest certified radius: "
                  "the decision-boundary certificate is never below the simplex or the global-Lipschitz one.")
    report.figure(sec, "certification_training_histogram",
                  histogram(hist, bins=30, title="Simplex certificates of the MLP", xlabel="certified radius"),
                  "Simplex certificates of the plain and the certificate-trained MLP on the same test digits.")
