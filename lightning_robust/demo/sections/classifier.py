"""Demo section: a SmallCNN trained on the bundled digits, its accuracy and predictions."""

from __future__ import annotations

import torch

from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.demo.context import DemoContext, read_csv_metrics
from lightning_robust.demo.report import Report
from lightning_robust.models import Classifier
from lightning_robust.nets import SmallCNN
from lightning_robust.utils.plotting import image_grid, line_plot


def run(ctx: DemoContext, report: Report) -> None:
    """Train the digits classifier that later sections reuse (``ctx.artifacts['digits_classifier']``)."""
    ctx.seed_everything()
    epochs = 3 if ctx.fast else 15
    dm = DigitsDataModule(batch_size=64, image_size=8, seed=ctx.seed)
    model = Classifier(SmallCNN(in_channels=1, num_classes=10, input_size=8),
                       optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))
    trainer = ctx.trainer("classifier", max_epochs=epochs)
    trainer.fit(model, datamodule=dm)
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    model.eval()
    ctx.artifacts["digits_classifier"] = model
    ctx.artifacts["digits_datamodule"] = dm

    n_train, n_val, n_test = (len(d) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset))  # type: ignore[arg-type]
    sec = report.section("Classifier on the bundled digits")
    report.text(sec, (
        "A `SmallCNN` (4 conv + 3 dense ReLU layers) trained with `lightning_robust.models.Classifier` on "
        f"scikit-learn's 1797 real 8x8 digits ({n_train} train / {n_val} val / {n_test} test images)"
        f", Adam, {epochs} epochs. Later sections attack, certify and "
        "interpret this model."
    ))
    report.table(sec, ["split", "accuracy", "loss"], [["test", test["test/acc"], test["test/loss"]]])

    # Training curve from the CSV logger's file (epoch-level validation accuracy).
    val = [(int(r["epoch"]), float(r["val/acc"])) for r in read_csv_metrics(trainer) if r.get("val/acc")]
    if val:
        xs, ys = zip(*val)
        report.figure(sec, "classifier_val_accuracy",
                      line_plot({"val accuracy": (xs, ys)}, title="Validation accuracy", xlabel="epoch",
                                ylabel="accuracy", ylim=(0.0, 1.0)),
                      "Validation accuracy per epoch.")

    x, y = next(iter(dm.test_dataloader()))
    x, y = x[:32], y[:32]
    with torch.no_grad():
        pred = model(x).argmax(1)
    captions = [f"{int(p)} ({int(t)})" for p, t in zip(pred, y)]
    report.figure(sec, "classifier_predictions",
                  image_grid(x, captions, correct=(pred == y).tolist(), nrow=8, cell=56,
                             title="prediction (true label)"),
                  "32 test digits: predicted class with the true class in brackets; red marks an error.")
