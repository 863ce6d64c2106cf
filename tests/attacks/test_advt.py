"""AdvT-Text (Miyato et al. 2017) and iAdvT-Text (Sato et al. 2018) against hand-computed perturbations, and the
discretisation and stopping rules shared by every text attack.

Planted geometry (3-D, chosen so that every quantity can be written out by hand): a bag-of-embeddings classifier
``score = w . sum_t e_t + b`` with ``w = (0, -3, -4) / 5`` and label 1, so the loss gradient at every word is
``c * (0, 3, 4)`` for one positive ``c`` that the sentence-level normalisation removes.

* word ``a = (1, 0, 0)``: nearest words by cosine ``b`` (0.707), ``c`` (0.447), ``e`` (0), then ``d`` (-1);
  directions ``a->b = (0, 1, 0)``, ``a->c = (0, 0, 1)``, ``a->e = (-1, -1, 0) / sqrt 2``;
* word ``b = (1, 1, 0)``: nearest ``a`` (0.707), ``c`` (0.316); directions ``(0, -1, 0)``, ``(0, -1, 2) / sqrt 5``.
"""

import math

import pytest
import torch
from torch import nn

from lightning_robust.attacks import SPGD, AdvTText, EmbeddingPGD, IAdvTText

E3 = torch.tensor([
    [0.0, 0.0, 0.0],   # 0 <pad>
    [0.0, 0.0, -1.0],  # 1 <unk> (special: never a neighbour)
    [1.0, 0.0, 0.0],   # 2 a
    [1.0, 1.0, 0.0],   # 3 b
    [1.0, 0.0, 2.0],   # 4 c
    [-1.0, 0.0, 0.0],  # 5 d
    [0.0, -1.0, 0.0],  # 6 e
])
A, B, C, D, E = 2, 3, 4, 5, 6


class Bag3(nn.Module):
    special_token_ids = (0, 1)

    def __init__(self, bias: float = 0.5, p_drop: float = 0.0) -> None:
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(E3.clone(), freeze=False, padding_idx=0)
        self.w = nn.Parameter(torch.tensor([0.0, -3.0, -4.0]) / 5)
        self.b = nn.Parameter(torch.tensor(bias))
        self.drop = nn.Dropout(p_drop)

    def get_input_embeddings(self):
        return self.embedding

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        e = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        m = torch.ones(e.shape[:2]) if attention_mask is None else attention_mask.float()
        score = (self.drop(e) * m.unsqueeze(-1)).sum(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], 1)


def _batch():
    ids = torch.tensor([[A, B], [A, 0]])
    return ids, (ids != 0).long(), torch.tensor([1, 1])


def test_advt_is_the_sentence_normalised_gradient_times_xi():
    ids, mask, y = _batch()
    r = AdvTText(xi=0.7).embedding_perturbation(Bag3(), ids, y, mask)
    g = torch.tensor([0.0, 0.6, 0.8])  # the unit gradient direction, the same at every word
    s1, s2 = (1 + math.sqrt(2)) / 2, 1.0  # mean word-embedding norm of each sentence
    # Sentence 1: two words with the same gradient, normalised together: each gets 1 / sqrt 2 of the norm.
    assert torch.allclose(r[0, 0], 0.7 * s1 * g / math.sqrt(2), atol=1e-6)
    assert torch.allclose(r[0, 1], 0.7 * s1 * g / math.sqrt(2), atol=1e-6)
    assert torch.allclose(r[1, 0], 0.7 * s2 * g, atol=1e-6) and (r[1, 1] == 0).all()


def test_iadvt_weights_neighbour_directions_by_normalised_gradient_and_normalises_the_sentence():
    ids, mask, y = _batch()
    r = IAdvTText(xi=0.7, num_neighbours=2).embedding_perturbation(Bag3(), ids, y, mask)
    # Word a: <g, a->b> = 3, <g, a->c> = 4 (times c); weights (3, 4) / 5; u_a = 0.6 (0,1,0) + 0.8 (0,0,1).
    u_a = torch.tensor([0.0, 0.6, 0.8])
    # Word b: <g, b->a> = -3, <g, b->c> = (-3 + 8) / sqrt 5 = sqrt 5; weights (-3, sqrt 5) / sqrt 14;
    # u_b = (-3 (0,-1,0) + (0,-1,2)) / sqrt 14 = (0, 2, 2) / sqrt 14.
    u_b = torch.tensor([0.0, 2.0, 2.0]) / math.sqrt(14)
    norm1 = math.sqrt(1 + 8 / 14)  # sentence-level L2 norm of (u_a, u_b)
    s1 = (1 + math.sqrt(2)) / 2
    assert torch.allclose(r[0, 0], 0.7 * s1 * u_a / norm1, atol=1e-6)
    assert torch.allclose(r[0, 1], 0.7 * s1 * u_b / norm1, atol=1e-6)
    assert torch.allclose(r[1, 0], 0.7 * u_a, atol=1e-6) and (r[1, 1] == 0).all()
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.tensor([0.7 * s1, 0.7]), atol=1e-6)


def test_iadvt_keeps_the_sign_of_neighbour_weights():
    ids, mask, y = torch.tensor([[A]]), torch.ones(1, 1, dtype=torch.long), torch.tensor([1])
    r = IAdvTText(xi=1.0, num_neighbours=3).embedding_perturbation(Bag3(), ids, y, mask)
    # Third neighbour e: <g, a->e> = -3 / sqrt 2, a negative weight (Sato et al.'s F.normalize keeps signs).
    d_e = torch.tensor([-1.0, -1.0, 0.0]) / math.sqrt(2)
    u = 3 * torch.tensor([0.0, 1.0, 0.0]) + 4 * torch.tensor([0.0, 0.0, 1.0]) - 3 / math.sqrt(2) * d_e
    assert torch.allclose(r[0, 0], u / u.norm(), atol=1e-6)


def _brute_round(ids, mask, r, special=(0, 1)):
    pts = E3[ids] + r
    d = torch.cdist(pts.flatten(0, 1), E3)
    d[:, list(special)] = float("inf")
    free = mask.bool() & ~torch.isin(ids, torch.tensor(special))
    d_orig = d.gather(1, ids.flatten().unsqueeze(1)).squeeze(1)
    best = torch.where(d.min(1).values < d_orig - 1e-6, d.argmin(1), ids.flatten())
    return torch.where(free.flatten(), best, ids.flatten()).view_as(ids)


@pytest.mark.parametrize("attack", [
    AdvTText(xi=2.5), IAdvTText(xi=2.5, num_neighbours=2), EmbeddingPGD(eps=2.0, steps=4, alpha=0.8),
    SPGD(max_words=1, threshold=0.0, steps=4, alpha=0.8)], ids=["advt", "iadvt", "pgd", "spgd"])
def test_every_attack_rounds_its_final_perturbation_to_the_nearest_word(attack):
    ids, mask, y = _batch()
    net = Bag3(bias=1.2)
    res = attack(net, ids, y, mask)
    assert torch.allclose(res.perturbation, attack.embedding_perturbation(net, ids, y, mask))
    assert torch.equal(res.input_ids, _brute_round(ids, mask, res.perturbation))
    with torch.no_grad():
        fooled = net(res.input_ids, mask).argmax(1) != y
    assert torch.equal(res.success, fooled)
    assert torch.equal(res.changed, res.input_ids != ids)


def test_stopping_rule_is_the_same_for_every_attack():
    # Without early stopping (the default for all) a one-step and a many-step attack both round only their
    # final perturbation; with early_stop=True a sample keeps its first fooling tokens.
    ids, mask, y = _batch()
    net = Bag3(bias=1.2)
    for cls, kw in ((AdvTText, {"xi": 2.5}), (IAdvTText, {"xi": 2.5}), (EmbeddingPGD, {"eps": 2.0}),
                    (SPGD, {"max_words": 1})):
        assert cls(**kw).early_stop is False
    late = EmbeddingPGD(eps=3.0, steps=6, alpha=0.8)(net, ids, y, mask)
    early = EmbeddingPGD(eps=3.0, steps=6, alpha=0.8, early_stop=True)(net, ids, y, mask)
    assert (late.steps[late.success] == 6).all()
    assert (early.steps[early.success] <= 6).all() and early.success.all()
    assert (early.num_changed <= late.num_changed).all()


def test_adversarial_training_mode_override_turns_dropout_on_and_restores_the_mode():
    ids, mask, y = _batch()
    net = Bag3(p_drop=0.5).eval()
    attack = AdvTText(xi=1.0)
    torch.manual_seed(0)
    r_train = attack.embedding_perturbation(net, ids, y, mask, model_mode="train")
    r_eval = attack.embedding_perturbation(net, ids, y, mask)
    assert not net.training
    # The gradient through dropout keeps only the surviving coordinates of words: its direction differs from the
    # eval-mode (deterministic) one unless the mask happens to keep everything.
    torch.manual_seed(0)
    drop = nn.Dropout(0.5).train()(torch.ones(2, 2, 3))
    g = torch.tensor([0.0, 0.6, 0.8]) * drop * mask.unsqueeze(-1)
    scale = (E3[ids].norm(dim=-1) * mask).sum(1) / mask.sum(1)
    want = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1) * scale.view(-1, 1, 1)
    assert torch.allclose(r_train, want, atol=1e-6)
    assert not torch.allclose(r_train, r_eval)


@pytest.mark.parametrize(("factory", "match"), [
    (lambda: AdvTText(xi=0.0), "xi"), (lambda: IAdvTText(xi=-1.0), "xi"),
    (lambda: IAdvTText(num_neighbours=0), "num_neighbours"), (lambda: AdvTText(xi=float("nan")), "xi")])
def test_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()
