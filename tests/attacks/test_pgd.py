"""PGD and FGSM against torchattacks (the reference), restarts, generators, targeted and CW variants."""

import pytest
import torch

from lightning_robust.attacks import FGSM, PGD, attack_loss

torchattacks = pytest.importorskip("torchattacks")


@pytest.fixture
def batch(digits_tensors):
    x, y = digits_tensors
    return x[-128:], y[-128:]


def test_pgd_linf_matches_torchattacks(trained_digits_cnn, batch):
    x, y = batch
    ours = PGD(eps=0.1, alpha=0.02, steps=10, random_start=False)(trained_digits_cnn, x, y)
    ref = torchattacks.PGD(trained_digits_cnn, eps=0.1, alpha=0.02, steps=10, random_start=False)(x, y)
    # Same algorithm, same sign steps: only float rounding of the projection may differ.
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


def test_pgd_l2_matches_torchattacks(trained_digits_cnn, batch):
    x, y = batch
    net = trained_digits_cnn
    ours = PGD(eps=0.5, alpha=0.1, steps=10, norm="l2", random_start=False)(net, x, y)
    ref = torchattacks.PGDL2(net, eps=0.5, alpha=0.1, steps=10, random_start=False)(x, y)
    # torchattacks normalizes the gradient of the batch-*mean* loss by ``norm + 1e-10``: its step is shorter
    # than ours by a relative 1e-10 / norm, which PGD's trajectory then amplifies (by how much depends on
    # float rounding, i.e. on the thread count). Compare where that relative error is below 1e-5.
    x0 = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x0), y), x0)
    normal = g.flatten(1).norm(dim=1) > 1e-5
    assert normal.float().mean() > 0.6
    assert torch.allclose(ours[normal], ref[normal], atol=1e-5, rtol=0)


def test_fgsm_matches_torchattacks(trained_digits_cnn, batch):
    x, y = batch
    ours = FGSM(eps=0.1)(trained_digits_cnn, x, y)
    ref = torchattacks.FGSM(trained_digits_cnn, eps=0.1)(x, y)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


def test_restarts_succeed_wherever_the_first_run_does(trained_digits_cnn, batch):
    x, y = batch
    net = trained_digits_cnn

    def fooled(attack, seed):
        x_adv = attack(net, x, y, generator=torch.Generator().manual_seed(seed))
        return net(x_adv).argmax(1) != y

    one = fooled(PGD(eps=0.08, alpha=0.02, steps=5, restarts=1), 3)
    three = fooled(PGD(eps=0.08, alpha=0.02, steps=5, restarts=3), 3)
    # The first restart draws the same random start from the same generator state.
    assert bool((three | ~one).all()) and int(three.sum()) >= int(one.sum())


def test_generator_makes_random_starts_reproducible(trained_digits_cnn, batch):
    x, y = batch
    attack = FGSM(eps=0.1, random_start=True)
    a = attack(trained_digits_cnn, x, y, generator=torch.Generator().manual_seed(1))
    b = attack(trained_digits_cnn, x, y, generator=torch.Generator().manual_seed(1))
    c = attack(trained_digits_cnn, x, y, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert attack.alpha == pytest.approx(0.125)  # Wong et al.'s 1.25 eps step


def test_targeted_attack_reaches_its_target(trained_digits_cnn, batch):
    x, y = batch
    net = trained_digits_cnn
    target = (y + 1) % 10
    untargeted = PGD(eps=0.3, alpha=0.05, steps=20)(net, x, y)
    by_chance = (net(untargeted).argmax(1) == target).float().mean()
    for loss in ("ce", "cw"):
        x_adv = PGD(eps=0.3, alpha=0.05, steps=20, targeted=True, loss=loss)(net, x, target)
        hit = (net(x_adv).argmax(1) == target).float().mean()
        assert hit > 0.7 and hit > 3 * by_chance, (loss, hit, by_chance)


def test_cw_loss_attack_and_kappa_cap(trained_digits_cnn, batch):
    x, y = batch
    net = trained_digits_cnn
    clean = (net(x).argmax(1) == y).float().mean()
    cw = (net(PGD(eps=0.15, alpha=0.03, steps=10, loss="cw")(net, x, y)).argmax(1) == y).float().mean()
    assert cw < clean - 0.3
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    assert attack_loss(logits, torch.tensor([1]), "cw", kappa=2.0).item() == pytest.approx(2.0)
    assert attack_loss(logits, torch.tensor([1]), "cw").item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="kappa must be a positive number"):
        PGD(kappa=0.0)


def test_pgd_within_l2_budget_with_random_start(trained_digits_cnn, batch):
    x, y = batch
    attack = PGD(eps=0.7, steps=4, norm="l2", random_start=True)
    x_adv = attack(trained_digits_cnn, x, y, generator=torch.Generator().manual_seed(0))
    dist = (x_adv - x).flatten(1).norm(dim=1)
    assert (dist <= 0.7 + 1e-5).all() and attack.threat.contains(x_adv, x).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("norm", "eps"), [("linf", 8 / 255), ("l2", 0.5)])
def test_low_precision_pgd_stays_within_eps(dtype, norm, eps):
    # Issue 18: x +- eps rounded to float16 fell outside the ball (|delta| = 0.03149 > 8/255). The attack
    # now projects in float32 and rounds toward x; checked exactly, in float64, on every sample.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)).to(dtype)
    x = torch.rand(64, 3, 4, 4).to(dtype)
    y = torch.randint(0, 3, (64,))
    for attack in (PGD(eps=eps, steps=5, norm=norm), FGSM(eps=eps, norm=norm, random_start=True)):
        x_adv = attack(net, x, y)
        assert x_adv.dtype == dtype
        delta = (x_adv.double() - x.double()).flatten(1)
        dist = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert float(dist.max()) <= eps * (1 + 1e-6)
        assert float(x_adv.double().min()) >= 0 and float(x_adv.double().max()) <= 1
        assert (x_adv != x).any()  # it did move
