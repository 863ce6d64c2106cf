"""TextClassifier: the adversarial objective, checkpoints, CLI-style construction, and 2-process DDP."""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_robust.attacks import SPGD, AdvTText, EmbeddingPGD, IAdvTText
from lightning_robust.datamodules import IMDBDataModule
from lightning_robust.models import TextClassifier
from lightning_robust.nets import WordVectorClassifier
from tests.helpers.ddp import RankGather, ddp_trainer, flat_params, single_trainer
from tests.helpers.imdb import make_imdb_folder


def _net(vocab_size=40):
    torch.manual_seed(0)
    return WordVectorClassifier(vocab_size=vocab_size, embedding_dim=8, hidden_size=8, dropout=0.0)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 40, (4, 6), generator=g)
    ids[2, 4:] = 0
    mask = (ids != 0).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


@pytest.mark.parametrize("mode", ["embedding", "tokens"])
def test_training_loss_is_clean_plus_weighted_adversarial(mode):
    attack = SPGD(max_words=2, threshold=0.0, steps=10, alpha=0.5)
    model = TextClassifier(_net(), attack=attack, adversarial_weight=0.5, adversarial_mode=mode)
    batch = _batch()
    loss = model.training_step(batch, 0)
    ids, mask, y = batch["input_ids"], batch["attention_mask"], batch["labels"]
    net = model.net
    clean = F.cross_entropy(net(ids, mask), y)
    if mode == "embedding":
        r = attack.embedding_perturbation(net, ids, y, mask)
        assert ((r.norm(dim=-1) > 0).sum(1) <= 2).all()
        adv = F.cross_entropy(net(inputs_embeds=net.embedding(ids) + r, attention_mask=mask), y)
    else:
        res = attack(net, ids, y, mask)
        assert res.num_changed.sum() > 0 and (res.num_changed <= 2).all()
        adv = F.cross_entropy(net(res.input_ids, mask), y)
    assert loss.item() == pytest.approx((clean + 0.5 * adv).item(), rel=1e-5)
    assert adv > clean  # the perturbation does raise the loss
    loss.backward()
    assert net.head.weight.grad is not None


@pytest.mark.parametrize("attack", [AdvTText(xi=1.0), IAdvTText(xi=1.0, num_neighbours=3),
                                    SPGD(max_words=2, steps=2)], ids=["advt", "iadvt", "spgd"])
def test_adversarial_loss_uses_a_train_mode_perturbation_and_equals_the_loss_there(attack):
    # Miyato et al. and Sato et al. take the adversarial gradient with dropout on: the training loss must equal
    # clean + lambda * CE at E[x] + r, with r the attack's perturbation computed in train mode, replayed here
    # with the same random stream (one dropout draw for the clean pass, one for the gradient, one for the
    # adversarial pass).
    torch.manual_seed(0)
    net = WordVectorClassifier(vocab_size=40, embedding_dim=8, hidden_size=8, dropout=0.5)
    model = TextClassifier(net, attack=attack, adversarial_weight=0.5).train()
    batch = _batch()
    ids, mask, y = batch["input_ids"], batch["attention_mask"], batch["labels"]
    torch.manual_seed(1)
    loss = model.training_step(batch, 0)
    torch.manual_seed(1)
    clean = F.cross_entropy(net(ids, mask), y)
    r = attack.embedding_perturbation(net, ids, y, mask, model_mode="train")
    adv = F.cross_entropy(net(inputs_embeds=net.embedding(ids) + r, attention_mask=mask), y)
    assert net.training
    assert loss.item() == pytest.approx((clean + 0.5 * adv).item(), rel=1e-5)
    # dropout was active in the perturbation's gradient: the eval-mode perturbation is a different one
    torch.manual_seed(1)
    net(ids, mask)
    assert not torch.allclose(r, attack.embedding_perturbation(net, ids, y, mask))
    # and perturbation_mode="attack" uses the attack's own (eval) mode
    model_eval = TextClassifier(net, attack=attack, adversarial_weight=0.5, perturbation_mode="attack").train()
    torch.manual_seed(1)
    loss_eval = model_eval.training_step(batch, 0)
    torch.manual_seed(1)
    clean = F.cross_entropy(net(ids, mask), y)
    r_eval = attack.embedding_perturbation(net, ids, y, mask)
    adv = F.cross_entropy(net(inputs_embeds=net.embedding(ids) + r_eval, attention_mask=mask), y)
    assert loss_eval.item() == pytest.approx((clean + 0.5 * adv).item(), rel=1e-5)


def test_checkpoint_has_only_primitive_hparams(tmp_path):
    imdb = make_imdb_folder(tmp_path / "imdb", n_train=6, n_test=2)
    dm = IMDBDataModule(str(imdb), tokenizer="word", vocab_size=40, batch_size=4, val_fraction=0.25)
    model = TextClassifier(_net(), attack=EmbeddingPGD(eps=0.5, steps=1), evaluate_attack=True)
    trainer = single_trainer(tmp_path, max_epochs=1, limit_val_batches=1, enable_checkpointing=True)
    trainer.fit(model, datamodule=dm)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)
    assert state["hyper_parameters"]["adversarial_weight"] == 1.0
    assert state["hyper_parameters"]["num_classes"] == 2
    assert "attack" not in state["hyper_parameters"] and "net" not in state["hyper_parameters"]
    assert {"val/adv_acc", "val/attack_success", "val/acc"} <= set(trainer.callback_metrics)


def test_bad_arguments():
    with pytest.raises(ValueError, match="adversarial_weight must be a non-negative number"):
        TextClassifier(_net(), attack=SPGD(), adversarial_weight=-1.0)
    with pytest.raises(ValueError, match="adversarial_mode must be one of"):
        TextClassifier(_net(), attack=SPGD(), adversarial_mode="pixels")
    with pytest.raises(ValueError, match="evaluate_attack=True needs an attack"):
        TextClassifier(_net(), evaluate_attack=True)
    with pytest.raises(ValueError, match="perturbation_mode must be one of"):
        TextClassifier(_net(), attack=AdvTText(), perturbation_mode="eval")
    with pytest.raises(TypeError, match="attack must be a TextAttack"):
        TextClassifier(_net(), attack="spgd")


def _ddp_model():
    pl.seed_everything(0)
    net = WordVectorClassifier(vocab_size=40, embedding_dim=8, hidden_size=8, dropout=0.0)
    return TextClassifier(net, attack=SPGD(max_words=2, steps=1), evaluate_attack=True,
                          eval_attack=SPGD(max_words=2, steps=3), optimizer=partial(torch.optim.Adam, lr=0.05))


@pytest.mark.ddp
def test_spgd_adversarial_training_ddp_ranks_agree(tmp_path):
    imdb = make_imdb_folder(tmp_path / "imdb", n_train=16, n_test=4)
    dm = IMDBDataModule(str(imdb), tokenizer="word", vocab_size=40, batch_size=4, val_fraction=0.25, seed=3)
    model = _ddp_model()
    trainer = ddp_trainer(tmp_path, max_epochs=2, limit_val_batches=2, callbacks=[RankGather(tmp_path / "p.pt")])
    trainer.fit(model, datamodule=dm)
    params = torch.load(tmp_path / "p.pt", weights_only=True)
    assert params.shape[0] == 2 and torch.equal(params[0], params[1])
    assert torch.equal(params[0], flat_params(model))  # rank 0's weights came back
    assert not torch.equal(params[0], flat_params(_ddp_model()))
    metrics = trainer.callback_metrics
    # The adversarial terms were logged (and synced) on every rank.
    assert {"train/adv_loss", "train/words_perturbed", "val/attack_success", "val/words_changed"} <= set(metrics)
    assert 0 < metrics["train/words_perturbed"] <= 2, metrics
