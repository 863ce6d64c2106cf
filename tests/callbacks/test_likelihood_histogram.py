"""LikelihoodHistogram on a foreign module with an exact log-density, its OOD variants and its AUROC."""

import math

import pytest
import pytorch_lightning as pl
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

from lightning_robust.callbacks import LikelihoodHistogram
from lightning_robust.callbacks.likelihood_histogram import make_ood, rank_auroc
from tests.helpers.ddp import single_trainer


class GaussianScorer(pl.LightningModule):
    """Not a GAN: a module whose `log_likelihood` is the exact standard-normal log-density."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return -0.5 * (x**2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)

    def training_step(self, batch, batch_idx):
        return (self.w**2).sum()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_rank_auroc_matches_sklearn_with_ties():
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 6, (40,), generator=g).double()
    neg = torch.randint(0, 6, (30,), generator=g).double() - 1
    ref = roc_auc_score([1] * 40 + [0] * 30, torch.cat([pos, neg]).numpy())
    assert abs(rank_auroc(pos, neg) - ref) < 1e-12


def test_ood_variants():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 8, 8, generator=g) * 0.5 + 0.25
    u = make_ood(x, "uniform", torch.Generator().manual_seed(1))
    assert u.shape == x.shape and u.min() >= x.min() and u.max() <= x.max()
    s = make_ood(x, "shuffled", torch.Generator().manual_seed(1))
    assert torch.equal(s.flatten(1).sort(1).values, x.flatten(1).sort(1).values) and not torch.equal(s, x)
    big = torch.randn(20000, 3, generator=g) * torch.tensor([1.0, 2.0, 3.0]) + 5
    gauss = make_ood(big, "gaussian", torch.Generator().manual_seed(1))
    torch.testing.assert_close(gauss.mean(0), big.mean(0), atol=0.1, rtol=0)
    torch.testing.assert_close(gauss.std(0), big.std(0), atol=0.1, rtol=0)
    with pytest.raises(ValueError, match="ood\\[0\\] must be one of"):
        LikelihoodHistogram(ood=("noise",))


def test_logs_exact_scores_of_a_foreign_module(tmp_path):
    x = torch.randn(96, 2, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, torch.zeros(96)), batch_size=32)
    cb = LikelihoodHistogram(ood=("uniform", "shuffled"), num_samples=80)
    trainer = single_trainer(tmp_path, max_epochs=1, callbacks=[cb], num_sanity_val_steps=0)
    module = GaussianScorer()
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    expected = module.log_likelihood(x[:80]).double()
    torch.testing.assert_close(cb.scores["in-distribution"], expected)
    assert abs(float(trainer.callback_metrics["likelihood/mean_in-distribution"]) - float(expected.mean())) < 1e-5
    auroc = rank_auroc(cb.scores["in-distribution"], cb.scores["uniform"])
    assert abs(float(trainer.callback_metrics["likelihood/auroc_uniform"]) - auroc) < 1e-6
    assert cb.state_dict()["last_means"]["shuffled"] == pytest.approx(float(cb.scores["shuffled"].mean()))
    assert list((tmp_path / "images").glob("likelihood_histogram_step*.png"))


def test_missing_scoring_method_is_a_clear_error(tmp_path):
    class NoScore(GaussianScorer):
        log_likelihood = None  # type: ignore[assignment]

    x = torch.randn(8, 2)
    loader = DataLoader(TensorDataset(x, torch.zeros(8)), batch_size=8)
    trainer = single_trainer(tmp_path, max_epochs=1, callbacks=[LikelihoodHistogram()], num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=r"method='log_likelihood' is not a method of NoScore"):
        trainer.fit(NoScore(), train_dataloaders=loader, val_dataloaders=loader)
    assert trainer.global_step == 0  # failed at the start of fit, before the first step
