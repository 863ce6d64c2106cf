"""Demo section: saliency maps of the digits classifier, their certified robustness, and the Hessian claim."""

from __future__ import annotations

import torch

from lightning_robust.datamodules import load_digits_tensors
from lightning_robust.demo.context import DemoContext
from lightning_robust.demo.report import Report
from lightning_robust.interpret import (
    certified_topk_intersection,
    gradient_saliency,
    group_features,
    hessian_eigen_analysis,
    scaled_smoothgrad,
    smoothgrad,
    sparsified_smoothgrad,
)
from lightning_robust.utils.plotting import image_grid

SIGMA, TAU, K_FRACTION = 0.2, 0.1, 0.2
RADII = (0.05, 0.1, 0.2, 0.3)


def _unit(maps: torch.Tensor) -> torch.Tensor:
    a = maps.abs()
    return a / a.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)


def _classifier(ctx: DemoContext) -> torch.nn.Module:
    model = ctx.artifacts.get("digits_classifier")
    if model is not None:
        return model.eval()
    # Run on its own (``--only interpretation``): train a small digits CNN quickly.
    from lightning_robust.nets import SmallCNN

    x, y = load_digits_tensors(8, 1)
    net = SmallCNN(input_size=8)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(ctx.seed)
    for _ in range(3 if ctx.fast else 8):
        for idx in torch.randperm(1400, generator=g).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def run(ctx: DemoContext, report: Report) -> None:
    """Explain test digits with gradient, SmoothGrad and sparsified SmoothGrad; certify the latter."""
    ctx.seed_everything()
    model = _classifier(ctx)
    device = next(model.parameters()).device
    x_all, _ = load_digits_tensors(8, 1)
    n_img = 8 if ctx.fast else 16
    n_samples = 256 if ctx.fast else 2048
    n_show = 8
    x = x_all[-n_img:].to(device)
    gen = torch.Generator().manual_seed(ctx.seed)
    with torch.no_grad():
        pred = model(x).argmax(1)
    shown = slice(0, n_show)
    grad = gradient_saliency(model, x[shown], pred[shown])
    smooth = smoothgrad(model, x[shown], pred[shown], n_samples=min(n_samples, 512), sigma=SIGMA, generator=gen)
    scaled = scaled_smoothgrad(model, x, pred, n_samples=n_samples, sigma=SIGMA, batch_size=1024, generator=gen)
    sparse = sparsified_smoothgrad(model, x, pred, n_samples=n_samples, sigma=SIGMA, tau=TAU, batch_size=1024,
                                   generator=gen)
    # CASO's L1 weight acts on the loss gradient, whose scale varies by orders of magnitude with confidence:
    # each digit gets λ₁ equal to its own median |gradient| (about half the pixels can survive).
    grad_ce = hessian_eigen_analysis(model, x[shown], pred[shown]).gradient
    caso = torch.cat([group_features(model, x[i:i + 1], pred[i:i + 1], lambda1=float(grad_ce[i].abs().median()),
                                     lambda2=4.0, n_iter=30) for i in range(n_show)])
    k = max(1, int(K_FRACTION * x[0].numel()))
    cert_sparse = certified_topk_intersection(sparse, k, RADII, SIGMA, n_samples).double() / k
    cert_scaled = certified_topk_intersection(scaled, k, RADII, SIGMA, n_samples).double() / k

    sec = report.section("Interpretation: certified SmoothGrad and second-order explanations")
    report.text(sec, (
        "Saliency maps of the digits classifier (Levine, Singla & Feizi, arXiv 1905.12105): the input gradient "
        f"of the predicted logit, SmoothGrad ({n_samples} draws of Gaussian noise, σ = {SIGMA}), and "
        f"sparsified SmoothGrad (each noisy gradient reduced to its top {TAU:.0%} pixels before averaging). "
        "Sparsified SmoothGrad comes with a certificate: the number of its top-k pixels "
        f"(k = {k} of {x[0].numel()}) that provably stay top-k under *any* L2 perturbation of the input of "
        "the given size (Gaussian-smoothing bound, Hoeffding-corrected for the Monte-Carlo estimate at 95% "
        "confidence). Scaled SmoothGrad (each noisy |gradient| divided by its maximum) is the paper's baseline."
    ))
    rows = []
    for j, r in enumerate(RADII):
        rows.append([f"{r:g}", float(cert_sparse[:, j].mean()), float(cert_sparse[:, j].median()),
                     float(cert_scaled[:, j].mean()), float(cert_scaled[:, j].median())])
    report.table(sec, ["L2 radius", "sparsified: mean certified top-k", "sparsified: median",
                       "scaled: mean certified top-k", "scaled: median"], rows)

    grid = torch.cat([x[shown], _unit(grad), _unit(smooth), sparse[shown], _unit(caso)])
    captions = ([f"pred {int(p)}" for p in pred[shown]] + ["gradient"] * n_show + ["SmoothGrad"] * n_show
                + [f"cert {float(c):.2f}" for c in cert_sparse[shown, 1]] + ["CASO"] * n_show)
    report.figure(sec, "interpretation_saliency_maps",
                  image_grid(grid.cpu(), captions, nrow=n_show, cell=64,
                             title="input / |gradient| / |SmoothGrad| / sparsified SmoothGrad / CASO"),
                  "Rows: test digits; |input gradient|; |SmoothGrad|; sparsified SmoothGrad with its certified "
                  f"top-{k} fraction at L2 radius {RADII[1]}; CASO group features "
                  "(λ₁ = median |loss gradient|, λ₂ = 4).")

    # Second-order claim (Singla et al., arXiv 1902.00407): confident predictions have a nearly rank-one
    # input Hessian whose top eigenvector is nearly parallel to the gradient.
    x_test = x_all[1400:].to(device)
    info = hessian_eigen_analysis(model, x_test if not ctx.fast else x_test[:100])
    conf = info.confidence
    bins = [(0.0, 0.9), (0.9, 0.99), (0.99, 0.999), (0.999, 1.01)]
    hrows = []
    for lo, hi in bins:
        m = (conf >= lo) & (conf < hi)
        if bool(m.any()):
            hrows.append([f"[{lo:g}, {min(hi, 1.0):g}]", int(m.sum()), float(info.cosine[m].mean()),
                          float(info.top_share[m].mean()), float(info.runner_up_share[m].mean())])
    report.text(sec, (
        "The closed-form input Hessian of the ReLU network, `Jᵀ(diag(p) - ppᵀ)J` (Singla et al., arXiv "
        "1902.00407), on the held-out digits: mean |cosine| between its top eigenvector and the loss gradient, "
        "and the top eigenvalue's share of the trace, by prediction confidence. As p_max → 1 the Hessian tends to "
        "Σ_j p_j (J_j - J_y)(J_j - J_y)ᵀ over the other classes j, so it is rank one with the gradient as top "
        "eigenvector exactly when one runner-up class holds most of the remaining probability (last column)."
    ))
    report.table(sec, ["confidence", "digits", "mean cos(top eigenvector, gradient)", "mean top-eigenvalue share",
                       "mean runner-up share of 1 - p_max"], hrows)
    ctx.artifacts["interpretation_certificates"] = {"sparsified": cert_sparse.mean(0).tolist(),
                                                    "scaled": cert_scaled.mean(0).tolist()}
