"""Foreign attacks (callables, torchattacks objects) behind the Attack contract, and the AutoAttack preset."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from lightning_robust.attacks import (
    PGD,
    AutoAttack,
    ForeignAttack,
    ForeignAttackError,
    ThreatModel,
    as_attack,
)
from lightning_robust.attacks.foreign import check_adversarial_output
from lightning_robust.nets import SmallCNN

EPS = 0.1


def fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A cleverhans-style functional FGSM: the kind of callable a user brings."""
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()  # deliberately touches parameter .grad: the adapter must restore them
    assert x.grad is not None
    return (x + EPS * x.grad.sign()).clamp(0, 1).detach()


@pytest.fixture
def batch(digits_tensors: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_tensors
    return x[1400:1432], y[1400:1432]


def test_own_attack_is_returned_unchanged() -> None:
    attack = PGD(eps=EPS, alpha=0.02, steps=3)
    assert as_attack(attack) is attack
    with pytest.raises(ValueError, match="its own threat model"):
        as_attack(attack, threat=ThreatModel("l2", 1.0))


def test_callable_matches_direct_call_and_keeps_the_contract(trained_digits_cnn: SmallCNN, batch) -> None:
    x, y = batch
    net = trained_digits_cnn.train()  # the contract: attacked in eval mode, the flags restored
    try:
        grads_before = [p.grad for p in net.parameters()]
        attack = as_attack(fgsm, ThreatModel("linf", EPS))
        assert isinstance(attack, ForeignAttack)
        x_adv = attack(net, x, y)
        assert net.training and all(m.training for m in net.modules())
        assert [p.grad for p in net.parameters()] == grads_before
        net.eval()
        torch.testing.assert_close(x_adv, fgsm(net, x, y), atol=0, rtol=0)
        for p in net.parameters():
            p.grad = None
    finally:
        net.eval()
    assert bool(attack.within_budget(x_adv, x).all())
    # a real attack: it breaks some of the inputs the net gets right
    assert (net(x_adv).argmax(1) == y).sum() < (net(x).argmax(1) == y).sum()


def test_callable_without_threat_model_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"attacks\['mine'\].*threat=ThreatModel"):
        as_attack(fgsm, argument="attacks['mine']")
    with pytest.raises(ValueError, match="must be an Attack, a torchattacks attack or a callable"):
        as_attack(42)


@pytest.mark.parametrize(
    ("cheat", "message"),
    [
        (lambda m, x, y: torch.where(x < 0.5, x + 2 * EPS, x), "ball"),
        (lambda m, x, y: (x + EPS).clamp(max=1.0) + (x > 0.95).float() * 0.05, "box"),
        (lambda m, x, y: x.masked_fill(torch.arange(x.numel()).view_as(x) == 5, float("nan")), "NaN"),
        (lambda m, x, y: x[:-1], "shape"),
        (lambda m, x, y: x.double(), "dtype"),
        (lambda m, x, y: x.tolist(), "list"),
    ],
    ids=["outside-ball", "outside-box", "nan", "shape", "dtype", "not-a-tensor"],
)
def test_cheating_foreign_attack_is_refused(trained_digits_cnn: SmallCNN, batch, cheat, message: str) -> None:
    x, y = batch
    attack = as_attack(cheat, ThreatModel("linf", EPS), argument="cheat")
    with pytest.raises(ForeignAttackError, match=message):
        attack(trained_digits_cnn, x, y)


def test_outside_ball_error_counts_the_offending_samples(trained_digits_cnn: SmallCNN, batch) -> None:
    x, y = batch

    def one_bad(m, x, y):  # one sample moved by 2 eps on its dark pixels, the rest left clean
        out = x.clone()
        out[3] = torch.where(x[3] < 0.5, x[3] + 2 * EPS, x[3])
        return out

    with pytest.raises(ForeignAttackError, match="returned 1 of 32 samples outside the linf ball"):
        as_attack(one_bad, ThreatModel("linf", EPS))(trained_digits_cnn, x, y)


def test_generator_drives_a_foreign_attack_and_the_global_stream_is_untouched(trained_digits_cnn, batch) -> None:
    x, y = batch

    def random_noise(m, x, y):
        torch.manual_seed(123)  # a foreign attack that re-seeds the global RNG, as torchattacks' APGD does
        return (x + EPS * (2 * torch.rand_like(x) - 1)).clamp(0, 1)

    attack = as_attack(random_noise, ThreatModel("linf", EPS))
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    a = attack(trained_digits_cnn, x, y, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.rand(3), expected_next)  # the caller's stream goes on as if untouched
    b = attack(trained_digits_cnn, x, y, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)


def test_torchattacks_object_is_rebound_to_the_called_model(trained_digits_cnn: SmallCNN, batch) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    other = SmallCNN(in_channels=1, num_classes=10, input_size=8).eval()  # untrained: a different model
    ta = torchattacks.PGD(other, eps=EPS, alpha=0.02, steps=10, random_start=False)
    attack = as_attack(ta)
    assert (attack.threat.norm, attack.threat.eps) == ("linf", EPS)
    x_adv = attack(trained_digits_cnn, x, y)
    assert ta.model is other  # the binding is put back
    reference = torchattacks.PGD(trained_digits_cnn, eps=EPS, alpha=0.02, steps=10, random_start=False)(x, y)
    torch.testing.assert_close(x_adv, reference, atol=0, rtol=0)
    l2 = as_attack(torchattacks.PGDL2(other, eps=0.5))
    assert (l2.threat.norm, l2.threat.eps) == ("l2", 0.5)
    with pytest.raises(ValueError, match="CW without an eps budget"):
        as_attack(torchattacks.CW(other))


def test_robustness_evaluation_accepts_foreign_attacks(trained_digits_cnn: SmallCNN) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    from lightning_robust.callbacks import RobustnessEvaluation

    callback = RobustnessEvaluation({"ta": torchattacks.PGD(trained_digits_cnn, eps=EPS),
                                     "fn": as_attack(fgsm, ThreatModel("linf", EPS))})
    assert all(isinstance(a, ForeignAttack) and a.threat.eps == EPS for a in callback.attacks.values())
    # A bare callable states no budget: it is accepted as is, and only the [0, 1] box is checked for it
    # (tests/callbacks/test_evaluation_callback.py); wrapping it with a ThreatModel adds the budget checks.
    assert RobustnessEvaluation({"fn": fgsm}).attacks["fn"] is fgsm


def test_autoattack_without_torchattacks_names_the_install_command(monkeypatch, trained_digits_cnn, batch) -> None:
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks now raises ImportError
    x, y = batch
    with pytest.raises(ImportError, match="pip install --no-deps torchattacks"):
        AutoAttack(eps=EPS)(trained_digits_cnn, x, y)


def test_autoattack_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="norm"):
        AutoAttack(norm="l1")
    with pytest.raises(ValueError, match="n_iter"):
        AutoAttack(n_iter=0)
    with pytest.raises(ValueError, match="eps"):
        AutoAttack(eps=-1.0)


@pytest.mark.slow
def test_autoattack_is_at_least_as_strong_as_pgd20(trained_digits_cnn: SmallCNN, batch, one_thread) -> None:
    """Same inputs, same eps: AutoAttack's robust accuracy <= PGD-20's (its APGD-CE alone is a stronger PGD).

    Fewer iterations and queries than the standard 100 / 5000 keep this test at a few seconds on CPU (the
    standard settings take about 100 s on 64 digits); the ensemble's logic (each component on the
    survivors of the previous ones) is the same.
    """
    pytest.importorskip("torchattacks")
    x, y = batch
    net = trained_digits_cnn
    clean = net(x).argmax(1) == y
    pgd = PGD(eps=EPS, alpha=EPS / 4, steps=20)(net, x, y, generator=torch.Generator().manual_seed(0))
    aa = AutoAttack(eps=EPS, n_iter=10, n_queries=100)(net, x, y, generator=torch.Generator().manual_seed(0))
    assert bool(ThreatModel("linf", EPS).contains(aa, x).all())
    with torch.no_grad():
        robust_pgd = (net(pgd).argmax(1) == y) & clean
        robust_aa = (net(aa).argmax(1) == y) & clean
    assert robust_aa.sum() <= robust_pgd.sum()
    assert robust_aa.sum() < clean.sum()  # it does break inputs
    # inputs the net already gets wrong are left as they are
    torch.testing.assert_close(aa[~clean], x[~clean], atol=0, rtol=0)


def test_check_adversarial_output_refuses_a_nan_clean_input_by_name() -> None:
    x = torch.rand(2, 1, 4, 4)
    threat = ThreatModel("linf", 0.1)
    assert check_adversarial_output(x.clone(), x, threat) is not None
    with pytest.raises(ValueError, match=r"\bx\b.*NaN or inf"):
        check_adversarial_output(x.clone(), x.masked_fill(x > 0.5, float("nan")), threat)
