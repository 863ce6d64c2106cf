"""NW domain adaptation: the NW alignment reduces to the Wasserstein dual, labels unused, errors, DDP."""

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_robust.datamodules import ColoredDigitsDataModule, DomainAdaptationDataModule
from lightning_robust.models import NWDomainAdaptation
from lightning_robust.nets import MLP, DigitFeatureExtractor
from tests.helpers.ddp import RankGather, ddp_trainer, flat_params, single_trainer

CLASSES, P_SOURCE = [1, 4, 8], [0.6, 0.3, 0.1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(method: str = "nw", **kw) -> NWDomainAdaptation:
    torch.manual_seed(0)
    f = DigitFeatureExtractor(image_size=16, dropout=0.0)
    opt = functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.999))
    return NWDomainAdaptation(f, MLP(f.out_features, 3, (32,)), MLP(f.out_features, 1, (32,)), method=method,
                              adversarial_every=2, optimizer=opt, critic_optimizer=opt, **kw)


def _dm(batch_size: int = 48, **target_kw) -> DomainAdaptationDataModule:
    src = ColoredDigitsDataModule(colored=False, half=0, classes=CLASSES, class_proportions=P_SOURCE,
                                  batch_size=batch_size)
    tgt = ColoredDigitsDataModule(colored=True, half=1, classes=CLASSES, class_proportions=P_SOURCE[::-1],
                                  batch_size=batch_size, **target_kw)
    return DomainAdaptationDataModule(src, tgt)


def test_nw_alignment_at_batch_frequencies_is_the_wasserstein_dual():
    nw, w = _model("nw"), _model("wasserstein")
    w.critic.load_state_dict(nw.critic.state_dict())
    d = nw.feature_extractor.out_features
    f_s, f_t = torch.randn(30, d), torch.randn(20, d)
    y = torch.tensor([0] * 18 + [1] * 9 + [2] * 3)
    freq = torch.bincount(y, minlength=3).double() / len(y)
    a = nw.alignment_objective(f_s, y, f_t, freq.float())
    b = w.alignment_objective(f_s, y, f_t, freq.float())
    ref = nw.critic(f_t).mean() - nw.critic(f_s).mean()
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(b, ref.squeeze(), atol=1e-6)
    # Re-weighting towards class 2 moves the source term to class 2's mean score.
    one_hot = torch.tensor([0.0, 0.0, 1.0])
    c = nw.alignment_objective(f_s, y, f_t, one_hot)
    assert torch.allclose(c, nw.critic(f_t).mean() - nw.critic(f_s[y == 2]).mean(), atol=1e-6)


def test_target_labels_are_never_used_and_source_only_ignores_the_target(tmp_path):
    def fit(method: str, **target_kw) -> NWDomainAdaptation:
        model = _model(method, critic_regularizer="gp")
        pl.seed_everything(0)
        single_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(model, datamodule=_dm(**target_kw))
        return model

    a = fit("nw")
    # The same run with the target's labels shuffled in place: nothing may change.
    c = _model("nw", critic_regularizer="gp")
    dm = _dm()
    dm.setup("fit")
    y = dm.target.train_dataset.dataset.tensors[1]
    y.copy_(y[torch.randperm(len(y), generator=torch.Generator().manual_seed(3))])
    pl.seed_everything(0)
    single_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(c, datamodule=dm)
    assert torch.equal(flat_params(a), flat_params(c))
    assert not torch.allclose(a.proportions, torch.full((3,), 1 / 3))  # π was trained
    so = _model("source_only")
    critic0 = flat_params(so.critic)
    pl.seed_everything(0)
    single_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(so, datamodule=_dm())
    assert torch.equal(flat_params(so.critic), critic0)


def test_bad_arguments_and_feature_widths():
    f = DigitFeatureExtractor(image_size=16)
    with pytest.raises(ValueError, match="method"):
        NWDomainAdaptation(f, MLP(f.out_features, 3), MLP(f.out_features, 1), method="coral")
    with pytest.raises(ValueError, match="method='nw' needs a critic"):
        NWDomainAdaptation(f, MLP(f.out_features, 3), None, method="nw")
    with pytest.raises(ValueError, match=rf"produces {f.out_features} features .* critic expects 10"):
        NWDomainAdaptation(f, MLP(f.out_features, 3), MLP(10, 1), method="nw")
    with pytest.raises(ValueError, match=rf"produces {f.out_features} features .* classifier expects 7"):
        NWDomainAdaptation(f, MLP(7, 3), MLP(f.out_features, 1), method="dann")
    with pytest.raises(ValueError, match="proportions must sum to one"):
        NWDomainAdaptation(f, MLP(f.out_features, 3), MLP(f.out_features, 1), initial_proportions=[0.5, 0.2, 0.2])
    with pytest.raises(ValueError, match="adversarial_every"):
        NWDomainAdaptation(f, MLP(f.out_features, 3), MLP(f.out_features, 1), adversarial_every=0)
    # A feature extractor without `out_features` is checked at the first batch.
    lazy = NWDomainAdaptation(nn.Sequential(nn.Flatten()), MLP(5, 3), MLP(5, 1))
    with pytest.raises(ValueError, match="produces 768 features per sample but the classifier expects 5"):
        lazy._check_features(torch.zeros(2, 768))
    with pytest.raises(ValueError, match="same classes"):
        DomainAdaptationDataModule(ColoredDigitsDataModule(classes=[1, 2]), ColoredDigitsDataModule())


def _proportions(_trainer, module):
    return module.proportions


@pytest.mark.ddp
def test_ddp_ranks_agree_on_pi_and_weights(tmp_path):
    model = _model("nw", critic_regularizer="gp")
    trainer = ddp_trainer(tmp_path, find_unused_parameters=True, max_steps=3, limit_val_batches=0,
                          callbacks=[RankGather(tmp_path / "p.pt"), RankGather(tmp_path / "pi.pt", _proportions)])
    trainer.fit(model, datamodule=_dm(batch_size=24))
    params, pi = torch.load(tmp_path / "p.pt", weights_only=True), torch.load(tmp_path / "pi.pt", weights_only=True)
    assert torch.equal(params[0], params[1]) and torch.equal(pi[0], pi[1])
    assert torch.equal(params[0], flat_params(model))
    assert not torch.allclose(pi[0], torch.full((3,), 1 / 3).double())


class _FirstBatch(pl.Callback):
    """Keep the first training batch and a copy of the nets before the first step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            import copy

            self.batch = batch
            self.nets = copy.deepcopy((pl_module.feature_extractor, pl_module.critic))


def test_classwise_source_batches_give_the_authors_mixture_estimate(tmp_path):
    # Issue 21: with DomainAdaptationDataModule(classwise_source=True), batch k holds class k only and the NW
    # critic objective is mean_t D(F(x_t)) - Σ_k π_k mean_{batch k} D(F(x)) (the authors' trainer).
    dm = _dm(batch_size=16)
    dm.classwise_source = True
    model, keep = _model("nw"), _FirstBatch()
    pl.seed_everything(0)
    trainer = single_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[keep])
    trainer.fit(model, datamodule=dm)
    parts = keep.batch["source_by_class"]
    assert len(parts) == 3
    for k, (x, y) in enumerate(parts):
        assert 0 < x.shape[0] <= 16 and torch.all(y == k)  # a class smaller than a batch gives all it has
    f, d = keep.nets
    with torch.no_grad():
        target = d(f(keep.batch["target"][0])).mean()
        mixture = sum(d(f(x)).mean() / 3 for x, _ in parts)  # π starts uniform
        mixed_batch = d(f(keep.batch["source"][0])).mean()
    logged = float(trainer.callback_metrics["train/critic"])
    assert abs(logged - float(target - mixture)) < 1e-5
    assert abs(logged - float(target - mixed_batch)) > 1e-4  # the mixed source batch was not used
    with pytest.raises(ValueError, match="classwise_source must be a bool"):
        DomainAdaptationDataModule(dm.source, dm.target, classwise_source="yes")


def test_logs_carry_batch_size_and_class_mean_accuracy_is_the_mean_of_per_class_accuracies(tmp_path):
    # Issue 26: no "Trying to infer the `batch_size`" warning from our logs; issue 21: the class-mean target
    # accuracy (the authors' number) is the mean over classes of each class's accuracy, computed here by hand.
    import warnings

    model, dm = _model("nw"), _dm()
    dm.target.batch_size = 32  # source batches of 48: Lightning could only guess which is "the" batch size
    pl.seed_everything(0)
    trainer = single_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
        res = trainer.test(model, datamodule=dm, verbose=False)
    assert not [w for w in caught if "batch_size" in str(w.message)]
    x, y = dm.target.test_dataset.tensors if hasattr(dm.target.test_dataset, "tensors") else \
        dm.target.test_dataset.dataset.tensors
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    per_class = [float((pred[y == k] == k).double().mean()) for k in range(3)]
    logs = {k: v for d in res for k, v in d.items()}
    assert abs(logs["test/target_class_acc"] - sum(per_class) / 3) < 1e-6
    assert abs(logs["test/target_acc"] - float((pred == y).double().mean())) < 1e-6


def test_digit_feature_extractor_normalises_inputs_as_the_authors():
    torch.manual_seed(0)
    plain = DigitFeatureExtractor(image_size=16, dropout=0.0)
    norm = DigitFeatureExtractor(image_size=16, dropout=0.0, mean=[0.5] * 3, std=[0.5] * 3)
    norm.features.load_state_dict(plain.features.state_dict())
    x = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(norm(x), plain((x - 0.5) / 0.5))
    grey = torch.rand(4, 1, 16, 16)
    torch.testing.assert_close(norm(grey), plain((grey.expand(-1, 3, -1, -1) - 0.5) / 0.5))
    with pytest.raises(ValueError, match="mean and std must be given together"):
        DigitFeatureExtractor(mean=[0.5] * 3)
