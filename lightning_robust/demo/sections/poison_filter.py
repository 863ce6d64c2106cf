"""Demo section: clean-label poisons in the digits, caught by the Deep k-NN filter (arXiv 1909.13374)."""

from __future__ import annotations

import copy
from functools import partial

import torch
from torch import nn

from lightning_robust.attacks import FeatureCollision, LayerFeatures
from lightning_robust.callbacks import DeepKNNPoisonFilter
from lightning_robust.datamodules import DigitsDataModule, PoisonedDataModule
from lightning_robust.defenses import deep_knn_filter, l2_outlier_filter, one_class_svm_filter, random_eviction
from lightning_robust.demo.context import DemoContext
from lightning_robust.demo.report import Report
from lightning_robust.metrics import poison_detection_scores
from lightning_robust.models import Classifier
from lightning_robust.nets import LinearProbe, SmallCNN
from lightning_robust.utils.plotting import bar_chart, image_grid

TARGET_CLASS, BASE_CLASS, PER_CLASS, POISONS = 3, 8, 50, 5
# Similarity weight for [0, 1] pixels: the paper's beta0 (d_feat / d_in)^2 scaling assumes inputs much larger
# than the features (299x299x3 vs 2048); for 8x8 digits and 200 features it would pin the poison to its base.
BETA = 0.05


def _pretrained(ctx: DemoContext) -> nn.Module:
    """The classifier section's SmallCNN, or a freshly trained one when that section did not run."""
    clf = ctx.artifacts.get("digits_classifier")
    if clf is not None:
        return copy.deepcopy(clf.net).eval()
    model = Classifier(SmallCNN(in_channels=1, num_classes=10, input_size=8),
                       optimizer=partial(torch.optim.Adam, lr=2e-3))
    ctx.trainer("poison_filter_pretrain", max_epochs=3 if ctx.fast else 15).fit(
        model, datamodule=DigitsDataModule(batch_size=64, seed=ctx.seed))
    return copy.deepcopy(model.net).eval()


def _victim(net: nn.Module) -> Classifier:
    probe = LinearProbe(copy.deepcopy(net), head="classifier.4")
    return Classifier(probe, optimizer=partial(torch.optim.Adam, lr=0.01))


def run(ctx: DemoContext, report: Report) -> None:
    ctx.seed_everything()
    net = _pretrained(ctx)
    steps = 60 if ctx.fast else 400
    attack = FeatureCollision(steps=steps, lr=0.01, beta=BETA)
    crafted = PoisonedDataModule(DigitsDataModule(batch_size=64, seed=ctx.seed), attack=attack,
                                 feature_net=copy.deepcopy(net), feature_layer="classifier.3",
                                 target_class=TARGET_CLASS, base_class=BASE_CLASS, num_poisons=POISONS,
                                 examples_per_class=PER_CLASS, seed=ctx.seed)
    crafted.setup()
    assert crafted.poisons is not None and crafted.target is not None
    poisons, positions, target = crafted.poisons, crafted.base_indices, crafted.target

    # Fine-tune the last layer twice on the poisoned set: without, then with the filter callback.
    epochs = 6 if ctx.fast else 30
    outcomes = []
    filt = DeepKNNPoisonFilter(layer="net.net.classifier.3", filter_epoch=0)
    for name, callbacks in (("no defence", []), ("DeepKNNPoisonFilter", [filt])):
        dm = PoisonedDataModule(DigitsDataModule(batch_size=64, seed=ctx.seed), poisons=poisons,
                                poison_indices=positions, target_class=TARGET_CLASS, base_class=BASE_CLASS,
                                examples_per_class=PER_CLASS, seed=ctx.seed)
        model = _victim(net)
        trainer = ctx.trainer(f"poison_filter_{'filtered' if callbacks else 'plain'}", max_epochs=epochs,
                              callbacks=callbacks)
        trainer.fit(model, datamodule=dm)
        acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
        model.eval()
        with torch.no_grad():
            pred = int(model(target[None]).argmax(1))
        n_train = len(dm.train_dataset)  # type: ignore[arg-type]
        outcomes.append([name, n_train - len(dm.excluded_train_indices), pred,
                         "yes" if pred == BASE_CLASS else "no", acc])

    # The same decision as pure functions, beside the paper's baselines, on the pretrained features.
    f = LayerFeatures(net, "classifier.3")
    ds = crafted.train_dataset
    assert ds is not None
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # type: ignore[arg-type]
    y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])  # type: ignore[arg-type]
    with torch.no_grad():
        feats = f(x)
    is_poison = crafted.is_poisoned
    keeps = {
        "Deep k-NN (k=50)": deep_knn_filter(feats, y),
        "L2 outlier (5%)": l2_outlier_filter(feats, y, 0.05),
        "one-class SVM (nu=0.05)": one_class_svm_filter(feats, y, nu=0.05),
        "random (5%)": random_eviction(feats, y, 0.05, generator=torch.Generator().manual_seed(ctx.seed)),
    }
    rows, rates = [], {}
    for name, keep in keeps.items():
        s = poison_detection_scores(~keep, is_poison)
        rows.append([name, f"{int(s['poisons_removed'])}/{POISONS}", int(s["clean_removed"]), float(s["precision"]),
                     float(s["mcc"])])
        rates[name] = 100 * float(s["detection_rate"])
    assert filt.removed_indices is not None
    knn_removed = filt.removed_indices

    sec = report.section("Deep k-NN poison filter")
    report.text(sec, (
        "Clean-label poisoning in the transfer-learning setting of Peri et al. (arXiv 1909.13374): "
        f"{POISONS} feature-collision poisons (Poison Frogs, {steps} forward-backward steps, beta {BETA}) built "
        f"from the digit-"
        f"{BASE_CLASS} images nearest to test digit {TARGET_CLASS} #0 in the pretrained SmallCNN's feature "
        f"space keep their clean label {BASE_CLASS}; the victim retrains only the last layer (`LinearProbe`) on "
        f"{PER_CLASS} digits per class with the poisons. `DeepKNNPoisonFilter(filter_epoch=0)` removes points "
        "whose label is not the plurality of their k = 50 nearest neighbours (50 = examples per class, the "
        "paper's guideline) before fine-tuning."
    ))
    report.table(sec, ["victim", "training images", "target predicted as", "attack succeeded", "test accuracy"],
                 outcomes)
    report.table(sec, ["filter", "poisons removed", "clean removed (of 495)", "precision", "MCC"], rows)
    removed_imgs = x[knn_removed[:16]]
    captions = ["poison" if is_poison[i] else f"clean {int(y[i])}" for i in knn_removed[:16]]
    grid = torch.cat([target[None], x[positions], poisons, removed_imgs])
    caps = ([f"target {TARGET_CLASS}"] + [f"base {BASE_CLASS}"] * POISONS + [f"poison {BASE_CLASS}"] * POISONS
            + captions)
    ok = [True] * (1 + 2 * POISONS) + [bool(is_poison[i]) for i in knn_removed[:16]]
    report.figure(sec, "poison_filter_images",
                  image_grid(grid, caps, correct=ok, nrow=11, cell=56,
                             title="target, bases, poisons (row 1); removed by Deep k-NN (green = poison)"),
                  "Top: the target, the five bases and their feature-collision poisons. Below: the first points "
                  "the Deep k-NN filter removed (green: poisons, red: clean digits).")
    report.figure(sec, "poison_filter_detection",
                  bar_chart(rates, title="Poisons removed by each filter", ylabel="% of poisons",
                            ylim=(0.0, 110.0)),
                  "Share of the five poisons each filter removes (same features, same poisoned set).")
