"""DDP training against one process on the same global batches (one 2-process launch for every case).

Under DDP each rank reads its shard through a ``DistributedSampler``; the DDP runs here pass one with
``shuffle=False`` (Lightning keeps a sampler it is given; for a plain training loader it would add a shuffled
one), which gives rank ``r`` the indices ``r, r + 2, r + 4, ...``. Each rank takes a mean loss over its ``b``
samples and DDP averages the two gradients. For a loss that is a mean of per-sample terms this is the
gradient of the mean over the ``2 b`` samples of both ranks, so one process fed the *global* batches
``[rank 0's batch k; rank 1's batch k]`` (:func:`global_batches`) must end with the same weights, up to
float rounding. A case whose loss couples the samples of a batch, or whose randomness is keyed by the rank,
states in its ``build(world)`` how the one-process run reproduces what each rank does (e.g. the GAN draws
both ranks' latents).

:func:`run_ddp_cases` fits every case in one pair of processes (``strategy="ddp"`` through a subprocess;
DDP start-up costs ~8 s a process on the CI machine) and returns rank 0's final weights per case;
:func:`fit_single` runs the one-process counterpart in the test process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_robust.attacks import PGD, SPGD
from lightning_robust.datamodules import load_digits_tensors
from lightning_robust.models import (
    GAN,
    NWGAN,
    ARDStudent,
    Classifier,
    DistilledGAN,
    EntropicGAN,
    InterpretationRegularizedClassifier,
    NWDomainAdaptation,
    TextClassifier,
)
from lightning_robust.nets import MLP, DualCritic, LinearGenerator, MLPGenerator, WordVectorClassifier
from lightning_robust.utils.rng import keyed_generator
from tests.helpers.ddp import flat_params, run_ddp_script, single_trainer

__all__ = ["CASES", "EquivalenceCase", "fit_single", "global_batches", "run_ddp_cases"]

WORLD = 2


@dataclass(frozen=True)
class EquivalenceCase:
    """A LightningModule trained for ``steps`` batches of ``batch_size`` per rank on ``data()``."""

    build: Callable[[int], pl.LightningModule]  # world size -> a fresh, identically initialised module
    data: Callable[[], Dataset]
    batch_size: int
    steps: int
    find_unused_parameters: bool = False
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


def global_batches(dataset: Dataset, batch_size: int, steps: int, world: int = WORLD) -> DataLoader:
    """Batches of ``world * batch_size``: batch ``k`` is rank 0's batch ``k``, then rank 1's, ... under DDP."""
    order = [r + world * (k * batch_size + i) for k in range(steps) for r in range(world) for i in range(batch_size)]
    assert max(order) < len(dataset), "the data must cover every rank's batches without DistributedSampler padding"
    return DataLoader(Subset(dataset, order), batch_size=world * batch_size, shuffle=False)


def _trainer_kwargs(case: EquivalenceCase) -> dict[str, Any]:
    return dict(max_epochs=1, limit_train_batches=case.steps, limit_val_batches=0, num_sanity_val_steps=0,
                **case.trainer_kwargs)


def fit_single(case: EquivalenceCase, tmp_path: Path) -> torch.Tensor:
    """Fit the one-process counterpart of ``case`` on the global batches; return its flat weights."""
    model = case.build(1)
    loader = global_batches(case.data(), case.batch_size, case.steps)
    single_trainer(tmp_path, **_trainer_kwargs(case)).fit(model, train_dataloaders=loader)
    return flat_params(model)


_SCRIPT = """
import json, os, torch
import pytorch_lightning as pl
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, DistributedSampler
from tests.helpers.ddp import flat_params
from tests.helpers.ddp_equivalence import CASES, _trainer_kwargs
torch.set_num_threads(1)
paths = {{}}
for name in {names!r}:
    case = CASES[name]
    model = case.build(2)
    # Rank r reads r, r+2, ... (before the first launch LOCAL_RANK is unset in rank 0's process).
    data = case.data()
    sampler = DistributedSampler(data, num_replicas=2, rank=int(os.environ.get("LOCAL_RANK", "0")), shuffle=False)
    loader = DataLoader(data, batch_size=case.batch_size, sampler=sampler)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(
        find_unused_parameters=case.find_unused_parameters), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, default_root_dir="runs",
        **_trainer_kwargs(case))
    trainer.fit(model, train_dataloaders=loader)
    params = flat_params(model)
    gathered = trainer.strategy.all_gather(params).reshape(2, -1)
    if trainer.global_rank == 0:
        paths[name] = os.path.abspath(f"{{name}}.pt")
        torch.save({{"params": params, "ranks_equal": bool(torch.equal(gathered[0], gathered[1])),
                    "steps": trainer.global_step}}, paths[name])
if int(os.environ.get("LOCAL_RANK", "0")) == 0:
    json.dump(paths, open(os.environ["RESULT_PATH"], "w"))
"""


def run_ddp_cases(names: list[str], tmp_path: Path, timeout: float = 400.0) -> dict[str, dict[str, Any]]:
    """Fit every named case under 2-process DDP (gloo) in one launch; rank 0's results per case."""
    paths = run_ddp_script(_SCRIPT.format(names=list(names)), tmp_path, timeout=timeout)
    return {name: torch.load(paths[name], weights_only=True) for name in names}


# ---------------------------------------------------------------------------------------------- cases
# Every module below has a 2-process test in tests/models; these cases use nets without BatchNorm (whose
# per-rank batch statistics DDP does not average) and attacks without random starts, or draw each rank's
# randomness explicitly in the one-process run.

def _digits(n: int = 256) -> TensorDataset:
    x, y = load_digits_tensors(8, 1)
    return TensorDataset(x[:n], y[:n])


def _sgd() -> Any:
    return partial(torch.optim.SGD, lr=0.1, momentum=0.9)


def _mlp(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(64, 10, (32,))


def build_classifier(world: int) -> pl.LightningModule:
    # Madry adversarial training: PGD without random start is a per-sample function of (x, y, weights).
    return Classifier(_mlp(0), optimizer=_sgd(), attack=PGD(eps=0.1, alpha=0.04, steps=2, random_start=False))


def build_ard(world: int) -> pl.LightningModule:
    teacher = _mlp(1).eval()
    return ARDStudent(_mlp(0), teacher, attack=PGD(eps=0.1, alpha=0.04, steps=2, random_start=False), alpha=0.7,
                      temperature=4.0, optimizer=_sgd())


def build_interpretation(world: int) -> pl.LightningModule:
    # The saliency penalty averages over samples the attack moved (all of them for PGD here): per-sample terms.
    return InterpretationRegularizedClassifier(
        _mlp(0), saliency_weight=5.0, attack=PGD(eps=0.1, alpha=0.04, steps=2, random_start=False),
        perturbation="attack", optimizer=_sgd())


class _ToyG(nn.Module):
    latent_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class _Stream:
    """What :meth:`_BothRanksGAN.step_generator` hands to ``sample_latents``: the stream's name."""

    def __init__(self, name: str) -> None:
        self.name = name


class _BothRanks:
    """Mixin for a GAN module: one process standing in for two ranks, whose global batch holds rank 0's
    samples then rank 1's, and whose latents are rank 0's draws then rank 1's.

    ``GAN.step_generator`` keys its stream by (seed, step, rank, stream); the key is rebuilt here for each
    rank so that the one-process run sees exactly the latents the two DDP ranks drew.
    """

    seed: int
    gan_step: Any
    device: torch.device

    def step_generator(self, stream: str = "latent") -> Any:
        return _Stream(stream)

    def _rank_generator(self, rank: int, stream: str) -> torch.Generator:
        return keyed_generator(f"{self.seed}/{int(self.gan_step)}/{rank}/{stream}", self.device)

    def sample_latents(self, n: int, generator: Any = None) -> torch.Tensor:
        parent = super()
        if not isinstance(generator, _Stream):
            return parent.sample_latents(n, generator)  # type: ignore[misc]
        per_rank = n // WORLD
        return torch.cat([parent.sample_latents(per_rank, self._rank_generator(r, generator.name))  # type: ignore[misc]
                          for r in range(WORLD)])


class _BothRanksGAN(_BothRanks, GAN):
    pass


class _BothRanksDistilledGAN(_BothRanks, DistilledGAN):
    pass


class _BothRanksNWGAN(_BothRanks, NWGAN):
    pass


class _BothRanksEntropicGAN(_BothRanks, EntropicGAN):
    """The entropic dual couples every real sample with every fake one of a batch, so DDP's loss is the mean of
    the two ranks' objectives, each on its own shard; so is the critic-fit test's transport (EntropicGAN
    all-reduces it). The one-process run computes exactly that on the two halves of the global batch."""

    def _per_shard(self, loss_fn: Any, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        n = a.shape[0] // WORLD
        parts = [loss_fn(a[r * n:(r + 1) * n], b[r * n:(r + 1) * n]) for r in range(WORLD)]
        logs = {k: sum(p[1][k] for p in parts) / WORLD for k in parts[0][1]}
        return sum(p[0] for p in parts) / WORLD, logs

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, logs = self._per_shard(super().discriminator_loss, real, fake)
        self._critic_fit = float(logs["transport"]) > 0
        return loss, logs

    def generator_loss(self, fake: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return self._per_shard(super().generator_loss, fake, real)


def build_gan(world: int) -> pl.LightningModule:
    # Hinge loss: a mean of per-sample terms for both players (no gradient penalty's random interpolation).
    torch.manual_seed(0)
    generator = _ToyG()
    critic = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.9))
    cls = GAN if world > 1 else _BothRanksGAN
    return cls(generator, critic, loss="hinge", n_critic=2, ema_decay=0.8, generator_optimizer=opt,
               discriminator_optimizer=opt)


def build_distilled_gan(world: int) -> pl.LightningModule:
    # Joint distillation: the paper's MSE to the teacher on shared latents plus a hinge adversarial term.
    torch.manual_seed(1)
    teacher = MLPGenerator(latent_dim=4, out_shape=(2,), hidden=(16, 16))
    torch.manual_seed(0)
    student = MLPGenerator(latent_dim=4, out_shape=(2,), hidden=(8,))
    critic = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.9))
    cls = DistilledGAN if world > 1 else _BothRanksDistilledGAN
    return cls(teacher, student, critic, mode="joint", loss="hinge", n_critic=2, ema_decay=0.8,
               generator_optimizer=opt, discriminator_optimizer=opt)


def build_nw_gan(world: int) -> pl.LightningModule:
    # Weight clipping, no gradient penalty: the NW dual is mean D(real) - Σ_k π_k mean D(G_k(z)), per-sample
    # terms in both players; π is learned (its own learning rate) and must match too.
    # SGD, not the paper's RMSprop: the critic's output bias has an exactly zero gradient (it cancels between
    # the real and the π-weighted fake terms since Σ π_k = 1), and RMSprop would scale that gradient's float
    # rounding noise, which differs between the two runs' summation orders, up to full-size steps.
    torch.manual_seed(0)
    opt = partial(torch.optim.SGD, lr=2e-2, momentum=0.5)
    cls = NWGAN if world > 1 else _BothRanksNWGAN
    return cls(LinearGenerator(hidden=(8,)), MLP(2, 1, hidden=(16,)), num_components=3, latent_dim=2,
               loss="wgan-clip", clip_value=0.1, n_critic=2, proportions_lr=5e-2, ema_decay=0.8,
               generator_optimizer=opt, discriminator_optimizer=opt)


def build_entropic_gan(world: int) -> pl.LightningModule:
    torch.manual_seed(0)
    generator = MLPGenerator(latent_dim=2, out_shape=(2,), hidden=(16, 16))
    critics = DualCritic(MLP(2, 1, (16, 16)), MLP(2, 1, (16, 16)))
    opt = partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.99))
    cls = EntropicGAN if world > 1 else _BothRanksEntropicGAN
    return cls(generator, critics, cost="l2", reg=0.5, n_critic=2, generator_optimizer=opt,
               discriminator_optimizer=opt)


class _Tokens(Dataset):
    """Fixed-length token sequences with padding and a random sentiment label, as text batches (dicts)."""

    def __init__(self, n: int = 128, length: int = 6, vocab: int = 40) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, vocab, (n, length), generator=g)
        self.ids[::3, length - 2:] = 0  # some padded sequences
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": self.labels[i]}


def build_text_classifier(world: int) -> pl.LightningModule:
    # SPGD adversarial training in embedding space: the sparse word perturbation is found per sentence.
    torch.manual_seed(0)
    net = WordVectorClassifier(vocab_size=40, embedding_dim=8, hidden_size=8, dropout=0.0)
    return TextClassifier(net, attack=SPGD(max_words=2, steps=2), adversarial_weight=0.5,
                          optimizer=partial(torch.optim.Adam, lr=0.05))


def _gaussians(n: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
    idx = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(centers[idx] + 0.2 * torch.randn(n, 2, generator=g), idx)


class _PerShardNWDomainAdaptation(NWDomainAdaptation):
    """NW's source weights ``π_k / n_k`` count each class *in the rank's own batch*, so DDP averages two
    per-shard objectives (critic, π and alignment alike); the one-process run computes exactly that on the two
    halves of each global batch. The classification loss is a per-sample mean and needs nothing."""

    def _source_weights(self, y_s: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        n = y_s.shape[0] // WORLD
        return torch.cat([super(_PerShardNWDomainAdaptation, self)._source_weights(y_s[r * n:(r + 1) * n], pi)
                          for r in range(WORLD)]) / WORLD

    def alignment_objective(self, f_s: torch.Tensor, y_s: torch.Tensor, f_t: torch.Tensor,
                            pi: torch.Tensor) -> torch.Tensor:
        n_s, n_t = f_s.shape[0] // WORLD, f_t.shape[0] // WORLD
        parent = super().alignment_objective
        return sum(parent(f_s[r * n_s:(r + 1) * n_s], y_s[r * n_s:(r + 1) * n_s], f_t[r * n_t:(r + 1) * n_t], pi)
                   for r in range(WORLD)) / WORLD


def build_nw_domain_adaptation(world: int) -> pl.LightningModule:
    # The paper's NW alignment with weight clipping (no gradient penalty's random interpolation), π learned,
    # the feature extractor aligned every second step.
    torch.manual_seed(0)
    features, classifier, critic = MLP(64, 16, (32,)), nn.Linear(16, 3), MLP(16, 1, (16,))
    cls = NWDomainAdaptation if world > 1 else _PerShardNWDomainAdaptation
    return cls(features, classifier, critic, method="nw", adversarial_every=2, clip_value=0.1,
               optimizer=_sgd(), critic_optimizer=_sgd(), proportions_optimizer=partial(torch.optim.SGD, lr=0.05))


class _SourceTarget(Dataset):
    """Paired items ``{"source": (x, y), "target": (x, y)}`` (what DomainAdaptationDataModule's loader yields):
    digits 0-2 as the source, the same classes in other proportions and brighter as the target."""

    def __init__(self) -> None:
        x, y = load_digits_tensors(8, 1)
        x, y = x.flatten(1), y
        keep = y < 3
        x, y = x[keep], y[keep]
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(y), generator=g)
        self.source = (x[order[:192]], y[order[:192]])
        # Target: classes 0 and 1 over-represented relative to 2 (label shift), inputs shifted (covariate shift).
        weights = torch.tensor([3.0, 2.0, 1.0])[y]
        rows = torch.multinomial(weights, 192, replacement=True, generator=g)
        self.target = ((0.7 * x[rows] + 0.3).clamp(0, 1), y[rows])

    def __len__(self) -> int:
        return 192

    def __getitem__(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"source": (self.source[0][i], self.source[1][i]), "target": (self.target[0][i], self.target[1][i])}


CASES: dict[str, EquivalenceCase] = {
    "classifier": EquivalenceCase(build_classifier, _digits, batch_size=16, steps=4),
    "ard": EquivalenceCase(build_ard, _digits, batch_size=16, steps=4),
    "interpretation": EquivalenceCase(build_interpretation, _digits, batch_size=16, steps=4),
    "gan": EquivalenceCase(build_gan, _gaussians, batch_size=16, steps=6, find_unused_parameters=True),
    "distilled_gan": EquivalenceCase(build_distilled_gan, _gaussians, batch_size=16, steps=6,
                                     find_unused_parameters=True),
    "entropic_gan": EquivalenceCase(build_entropic_gan, _gaussians, batch_size=16, steps=6,
                                    find_unused_parameters=True),
    "nw_gan": EquivalenceCase(build_nw_gan, _gaussians, batch_size=16, steps=6, find_unused_parameters=True),
    "text_classifier": EquivalenceCase(build_text_classifier, _Tokens, batch_size=8, steps=4),
    "nw_domain_adaptation": EquivalenceCase(build_nw_domain_adaptation, _SourceTarget, batch_size=16, steps=6,
                                            find_unused_parameters=True),
}
