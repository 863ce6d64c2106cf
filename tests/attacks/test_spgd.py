"""SPGD (arXiv 1905.12864) and the embedding-PGD baseline: projection, sparsity, rounding, contract.

Planted geometry: a bag-of-embeddings classifier (score = w . sum_t e_t + b) whose loss gradient is the same
vector for every word, so which neighbour each word moves toward, and which words survive the sparsity
constraint, follow from the embedding table alone and can be predicted by hand.
"""

import pytest
import torch
from torch import nn

from lightning_robust.attacks import SPGD, EmbeddingPGD, IAdvTText, TextAttackResult
from lightning_robust.attacks.spgd import (
    nearest_tokens,
    neighbour_directions,
    project_onto_neighbours,
    sparsify_words,
)

# id: word, 2-D embedding. "good" (x = 1) has "decent" and "great" as its nearest neighbours by cosine
# similarity; lowering x (what the attack wants, w = (1, 0)) points "good" toward "decent" and "movie" toward
# "picture" (cosine 0.99 vs 0.71 with the gradient), never toward "great" or "film".
WORDS = ["<pad>", "<unk>", "good", "decent", "great", "movie", "picture", "film", "the", "bad"]
EMB = torch.tensor([
    [0.0, 0.0],     # <pad>
    [0.0, 0.3],     # <unk>
    [1.0, 0.0],     # good
    [0.6, 0.05],    # decent
    [1.5, 0.1],     # great
    [0.0, 1.0],     # movie
    [-0.1, 0.9],    # picture
    [0.05, 1.1],    # film
    [0.02, -0.6],   # the
    [-1.0, 0.0],    # bad
])
GOOD, DECENT, GREAT, MOVIE, PICTURE, FILM, THE, BAD = 2, 3, 4, 5, 6, 7, 8, 9


class BagNet(nn.Module):
    """logits = [0, w . sum_t e_t + b] over unpadded positions; a text net (ids or inputs_embeds)."""

    special_token_ids = (0, 1)

    def __init__(self, bias: float = -0.7) -> None:
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(EMB.clone(), freeze=False, padding_idx=0)
        self.w = nn.Parameter(torch.tensor([1.0, 0.0]))
        self.b = nn.Parameter(torch.tensor(bias))
        self.drop = nn.Dropout(0.0)

    def get_input_embeddings(self):
        return self.embedding

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        e = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        m = torch.ones(e.shape[:2]) if attention_mask is None else attention_mask.float()
        score = (self.drop(e) * m.unsqueeze(-1)).sum(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], 1)


def _batch():
    # "good movie the <unk> <pad>" and "the good movie <pad> <pad>": positive (score 1 + 0.02 - 0.7 > 0), and
    # negative once "good" becomes "decent" (0.6 + 0.02 - 0.7 < 0)
    ids = torch.tensor([[GOOD, MOVIE, THE, 1, 0], [THE, GOOD, MOVIE, 0, 0]])
    mask = (ids != 0).long()
    mask[0, 3] = 1  # <unk> is a real (unpadded) token that must stay untouched
    return ids, mask, torch.tensor([1, 1])


# ---- pure functions against brute force -------------------------------------------------------------
def test_neighbours_are_top_k_cosine_and_directions_unit():
    allowed = torch.ones(len(WORDS), dtype=torch.bool)
    allowed[:2] = False
    tokens = torch.tensor([GOOD, MOVIE, THE])
    nbr, dirs, dist = neighbour_directions(EMB, tokens, k=2, allowed=allowed)
    for row, t in enumerate(tokens.tolist()):
        cos = {v: float(torch.cosine_similarity(EMB[t], EMB[v], dim=0)) for v in range(len(WORDS))
               if allowed[v] and v != t}
        expected = sorted(cos, key=lambda v: -cos[v])[:2]
        assert nbr[row].tolist() == expected
        for j, v in enumerate(expected):
            diff = EMB[v] - EMB[t]
            assert torch.allclose(dist[row, j], diff.norm())
            assert torch.allclose(dirs[row, j], diff / diff.norm())
    assert nbr[0].tolist() == [GREAT, DECENT]  # the planted neighbourhood of "good"


def test_projection_is_the_euclidean_projection_onto_the_segments():
    g = torch.Generator().manual_seed(0)
    N, K, D = 40, 4, 3
    r = torch.randn(N, D, generator=g)
    dirs = torch.randn(N, K, D, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    dist = torch.rand(N, K, generator=g) * 1.5
    proj, choice, length, _ = project_onto_neighbours(r, dirs, dist)
    # Brute force: the closest of 4001 points on each segment.
    s = torch.linspace(0, 1, 4001)
    pts = s.view(1, 1, -1, 1) * dist.unsqueeze(-1).unsqueeze(-1) * dirs.unsqueeze(2)  # [N, K, S, D]
    d2 = ((pts - r.view(N, 1, 1, D)) ** 2).sum(-1).flatten(1)
    best = pts.flatten(1, 2)[torch.arange(N), d2.argmin(1)]
    assert torch.allclose(proj, best, atol=2e-3)
    assert (length >= 0).all() and (length <= dist.gather(1, choice[:, None]).squeeze(1) + 1e-6).all()
    # Uncapped: the chosen direction is the one of highest cosine similarity with r.
    _, choice_free, length_free, _ = project_onto_neighbours(r, dirs, None)
    cos = torch.einsum("nd,nkd->nk", r / r.norm(dim=1, keepdim=True), dirs)
    pos = cos.max(1).values > 0
    assert torch.equal(choice_free[pos], cos.argmax(1)[pos])
    assert torch.allclose(length_free, torch.einsum("nd,nkd->nk", r, dirs).max(1).values.clamp_min(0))


def test_sparsity_keeps_words_above_threshold_and_at_most_max_words():
    g = torch.Generator().manual_seed(1)
    norms = torch.rand(6, 9, generator=g) * (torch.rand(6, 9, generator=g) > 0.2)
    for threshold, relative, cap in [(0.5, True, None), (0.3, False, 3), (0.0, True, 2), (0.9, True, 1)]:
        keep = sparsify_words(norms, None, threshold, relative, cap)
        for b in range(norms.shape[0]):
            row = norms[b].tolist()
            bar = threshold * max(row) if relative else threshold
            ok = [i for i, v in enumerate(row) if v > 0 and v >= bar]
            if cap is not None:
                ok = sorted(ok, key=lambda i: -row[i])[:cap]
            assert sorted(keep[b].nonzero().flatten().tolist()) == sorted(ok)


def test_nearest_tokens_matches_cdist_and_keeps_original_on_ties():
    g = torch.Generator().manual_seed(2)
    E = torch.randn(50, 4, generator=g)
    orig = torch.randint(0, 50, (30,), generator=g)
    pts = E[orig] + 0.8 * torch.randn(30, 4, generator=g)
    allowed = torch.ones(50, dtype=torch.bool)
    allowed[:5] = False
    got = nearest_tokens(pts, E, orig, allowed, chunk=7)
    d = torch.cdist(pts, E).masked_fill(~allowed, float("inf"))
    d[torch.arange(30), orig] = torch.cdist(pts, E)[torch.arange(30), orig]  # the original is always a candidate
    assert torch.equal(got, d.argmin(1))
    assert torch.equal(nearest_tokens(E[orig], E, orig, allowed), orig)


# ---- SPGD on the planted geometry -----------------------------------------------------------------
def test_spgd_moves_toward_the_planted_neighbour_and_changes_at_most_max_words():
    net = BagNet()
    ids, mask, y = _batch()
    res = SPGD(max_words=1, threshold=0.0, num_neighbours=2, steps=10, alpha=0.2)(net, ids, y, mask)
    assert isinstance(res, TextAttackResult)
    assert res.success.all() and res.clean_correct.all()
    assert res.num_changed.tolist() == [1, 1]
    # "good" (position 0 / 1) became "decent": the neighbour in the gradient's direction, not "great".
    assert res.input_ids[0].tolist() == [DECENT, MOVIE, THE, 1, 0]
    assert res.input_ids[1].tolist() == [THE, DECENT, MOVIE, 0, 0]
    # The continuous perturbation lies on the good->decent segment, past its midpoint.
    r = res.perturbation[0, 0]
    seg = EMB[DECENT] - EMB[GOOD]
    assert torch.allclose(r / r.norm(), seg / seg.norm(), atol=1e-5) and seg.norm() / 2 < r.norm() <= seg.norm() + 1e-6
    assert (res.perturbation[0, 1:] == 0).all()  # sparsity: nothing else moved
    assert torch.equal(res.changed, res.input_ids != ids)


def test_spgd_threshold_drops_weakly_aligned_words():
    net = BagNet()
    ids, mask, y = _batch()
    # One step: every word's gradient is -w; "good" aligns with its direction to "decent" (cos 0.99), "movie"
    # with its direction to "picture" (0.71), "the" with none of its neighbours as well.
    cos = {}
    for t, v in ((GOOD, DECENT), (MOVIE, PICTURE)):
        d = EMB[v] - EMB[t]
        cos[t] = float(-d[0] / d.norm())
    ratio = cos[MOVIE] / cos[GOOD]
    kw = dict(max_words=None, num_neighbours=2, steps=1, alpha=0.05)
    r_low = SPGD(threshold=ratio - 0.05, **kw).embedding_perturbation(net, ids, y, mask)
    r_high = SPGD(threshold=ratio + 0.05, **kw).embedding_perturbation(net, ids, y, mask)
    moved = lambda r: (r[0].norm(dim=-1) > 0).tolist()  # noqa: E731
    assert moved(r_low)[:2] == [True, True]
    assert moved(r_high)[:2] == [True, False]
    # The projection picked "picture" for "movie": the perturbation is parallel to picture - movie.
    d = EMB[PICTURE] - EMB[MOVIE]
    assert torch.allclose(r_low[0, 1] / r_low[0, 1].norm(), d / d.norm(), atol=1e-5)


def test_spgd_never_touches_padding_or_special_tokens_and_outputs_real_tokens():
    net = BagNet(bias=-1.5)  # hard to flip: many words must move
    ids, mask, y = _batch()
    res = SPGD(max_words=3, threshold=0.0, steps=30, alpha=0.3, protected_ids=[BAD])(net, ids, y, mask)
    assert (res.num_changed <= 3).all()
    assert res.input_ids[0, 3] == 1 and res.input_ids[0, 4] == 0 and (res.input_ids[1, 3:] == 0).all()
    new = res.input_ids[res.changed]
    assert ((new >= 2) & (new < len(WORDS)) & (new != BAD)).all()


def test_embedding_pgd_respects_budget_and_rounds_to_nearest_embedding():
    net = BagNet(bias=-0.9)
    ids, mask, y = _batch()
    attack = EmbeddingPGD(eps=1.5, steps=15, alpha=0.3)
    r = attack.embedding_perturbation(net, ids, y, mask)
    free = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    scale = (EMB[ids].norm(dim=-1) * free).sum(1) / free.sum(1)
    assert (r.flatten(1).norm(dim=1) <= 1.5 * scale + 1e-5).all()
    assert (r[~free] == 0).all()
    res = attack(net, ids, y, mask)
    assert res.success.all() and (res.num_changed >= 1).all()
    # Without early stopping the tokens are the rounding of the final perturbation: brute-force nearest
    # embedding among the allowed tokens (not <pad>/<unk>).
    pts = EMB[ids] + res.perturbation
    d = torch.cdist(pts.flatten(0, 1), EMB)
    d[:, :2] = float("inf")
    want = torch.where(free.flatten(), d.argmin(1), ids.flatten()).view_as(ids)
    assert torch.equal(res.input_ids, want)


def test_decoded_text_and_summary():
    net = BagNet()
    ids, mask, y = _batch()

    class Decoder:
        def decode(self, row):
            return " ".join(WORDS[i] for i in row if i != 0)

    res = SPGD(max_words=1, threshold=0.0, num_neighbours=2, steps=10, alpha=0.2)(net, ids, y, mask,
                                                                               tokenizer=Decoder())
    assert res.original_text == ["good movie the <unk>", "the good movie"]
    assert res.text == ["decent movie the <unk>", "the decent movie"]
    s = res.summary()
    assert s == {"n": 2.0, "success_rate": 1.0, "words_changed": 1.0,
                 "fraction_changed": pytest.approx((1 / 4 + 1 / 3) / 2)}


# ---- the attack contract ----------------------------------------------------------------------------
@pytest.mark.parametrize("attack", [SPGD(max_words=2, steps=3), EmbeddingPGD(eps=1.0, steps=3, random_start=True)],
                         ids=["spgd", "embedding_pgd"])
def test_mode_and_grads_restored_and_works_under_inference_mode(attack):
    net = BagNet()
    net.train()
    net.drop.eval()  # mixed modes come back mixed
    ids, mask, y = _batch()
    net(ids, mask).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    with torch.inference_mode():
        res = attack(net, ids, y, mask)
        r = attack.embedding_perturbation(net, ids, y, mask)
    assert net.training and not net.drop.training
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    assert not res.input_ids.requires_grad and not r.requires_grad
    assert not res.input_ids.is_inference() and res.input_ids.dtype == torch.long


def test_random_start_is_reproducible_with_a_generator():
    net = BagNet(bias=-1.2)
    ids, mask, y = _batch()
    attack = EmbeddingPGD(eps=1.0, steps=2, random_start=True)
    a = attack.embedding_perturbation(net, ids, y, mask, generator=torch.Generator().manual_seed(3))
    b = attack.embedding_perturbation(net, ids, y, mask, generator=torch.Generator().manual_seed(3))
    c = attack.embedding_perturbation(net, ids, y, mask, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_already_misclassified_samples_are_left_alone():
    net = BagNet(bias=-5.0)  # predicts negative for everything
    ids, mask, _ = _batch()
    res = SPGD(steps=3)(net, ids, torch.tensor([1, 1]), mask)
    assert not res.clean_correct.any() and res.success.all() and res.num_changed.sum() == 0
    assert res.steps.tolist() == [0, 0]


def test_works_on_a_hugging_face_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=2, pad_token_id=0)
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(5, 40, (3, 7))
    y = model(input_ids=ids).logits.argmax(1)
    res = SPGD(max_words=2, steps=5, alpha=0.5)(model, ids, y)
    assert (res.num_changed <= 2).all() and res.clean_correct.all()
    assert (res.input_ids[res.changed] > 0).all()


@pytest.mark.parametrize(
    ("call", "err", "match"),
    [
        (lambda net, ids, y, m: SPGD()(net, ids.float(), y, m), TypeError, "input_ids must be"),
        (lambda net, ids, y, m: SPGD()(net, ids + 100, y, m), ValueError, "input_ids must lie in"),
        (lambda net, ids, y, m: SPGD()(net, ids, y[:1], m), ValueError, "y must have shape"),
        (lambda net, ids, y, m: SPGD()(net, ids, y, m[:, :2]), ValueError, "attention_mask must have"),
        (lambda net, ids, y, m: SPGD()(nn.Linear(2, 2), ids, y, m), TypeError, "get_input_embeddings"),
    ],
)
def test_bad_inputs(call, err, match):
    ids, mask, y = _batch()
    with pytest.raises(err, match=match):
        call(BagNet(), ids, y, mask)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: SPGD(max_words=0), "max_words must be a positive integer"),
        (lambda: SPGD(threshold=-1.0), "threshold must be a non-negative number"),
        (lambda: SPGD(threshold=1.5), "threshold must lie in"),
        (lambda: SPGD(threshold_mode="ratio"), "threshold_mode must be one of"),
        (lambda: SPGD(num_neighbours=0), "num_neighbours must be a positive integer"),
        (lambda: SPGD(steps=0), "steps must be a positive integer"),
        (lambda: EmbeddingPGD(eps=0.0), "eps must be a positive number"),
        (lambda: SPGD(protected_ids=[-1]), "protected_ids must be non-negative"),
    ],
)
def test_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_neighbour_cache_matches_and_follows_in_place_updates():
    from lightning_robust.attacks.spgd import cached_neighbours

    g = torch.Generator().manual_seed(5)
    emb = nn.Embedding(60, 5)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(60, 5, generator=g))
    allowed = torch.ones(60, dtype=torch.bool)
    allowed[0] = False
    for _ in range(2):  # the second pass is served from the cache
        for tokens in (torch.tensor([3, 7, 11]), torch.tensor([7, 20, 3, 41])):
            E = emb.weight.detach()
            got = cached_neighbours(E, tokens, 4, allowed)
            want = neighbour_directions(E, tokens, 4, allowed)
            assert all(torch.allclose(a.float(), b.float(), atol=1e-6) for a, b in zip(got, want))
        with torch.no_grad():  # an optimizer-style in-place step must invalidate the cached neighbours
            emb.weight.mul_(torch.rand(60, 1, generator=g) + 0.5).add_(0.3 * torch.randn(60, 5, generator=g))


def test_neighbour_cache_tells_apart_tables_at_the_same_address_and_version():
    # ``.data`` writes do not bump the version counter: the table at this address is another one (as when a freed
    # table's memory holds the next model's), and the cache must not serve the first table's neighbours.
    from lightning_robust.attacks.spgd import cached_neighbours

    g = torch.Generator().manual_seed(8)
    E = torch.randn(50, 4, generator=g)
    allowed = torch.ones(50, dtype=torch.bool)
    tokens = torch.arange(50)
    cached_neighbours(E, tokens, 3, allowed)
    version = E._version
    E.data.copy_(torch.randn(50, 4, generator=g))
    assert E._version == version
    got = cached_neighbours(E, tokens, 3, allowed)
    want = neighbour_directions(E, tokens, 3, allowed)
    assert torch.equal(got[0], want[0])
    assert all(torch.allclose(a.float(), b.float(), atol=1e-6) for a, b in zip(got, want))


def test_neighbour_refresh_reuses_lists_then_equals_a_fresh_computation():
    # Sato et al.'s periodic nearest-word table: with refresh=n the lists survive n calls after the table changed
    # (directions and distances follow the current table); right after the refresh they equal a fresh computation.
    from lightning_robust.attacks.spgd import cached_neighbours

    g = torch.Generator().manual_seed(9)
    emb = nn.Embedding(80, 6)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(80, 6, generator=g))
    allowed = torch.ones(80, dtype=torch.bool)
    allowed[0] = False
    tokens = torch.arange(1, 80)
    E = emb.weight.detach()
    first = cached_neighbours(E, tokens, 5, allowed, refresh=3)
    old = neighbour_directions(E, tokens, 5, allowed)
    assert torch.equal(first[0], old[0])
    with torch.no_grad():  # a large in-place step: many neighbour lists change
        emb.weight.add_(1.5 * torch.randn(80, 6, generator=g))
    E = emb.weight.detach()
    new = neighbour_directions(E, tokens, 5, allowed)
    assert not torch.equal(new[0], old[0])
    for _ in range(2):  # calls 2 and 3: the old lists, with directions and distances from the current table
        nbr, dirs, dist = cached_neighbours(E, tokens, 5, allowed, refresh=3)
        assert torch.equal(nbr, old[0])
        diff = E[old[0]] - E[tokens].unsqueeze(1)
        torch.testing.assert_close(dist, diff.norm(dim=-1))
        torch.testing.assert_close(dirs, diff / diff.norm(dim=-1, keepdim=True))
    nbr, dirs, dist = cached_neighbours(E, tokens, 5, allowed, refresh=3)  # call 4: refreshed
    assert torch.equal(nbr, new[0])
    torch.testing.assert_close(dirs, new[1])
    torch.testing.assert_close(dist, new[2])


def test_neighbour_refresh_is_an_attack_option():
    with pytest.raises(ValueError, match="neighbour_refresh must be an integer >= 0"):
        SPGD(neighbour_refresh=-1)
    with pytest.raises(ValueError, match="neighbour_refresh must be an integer >= 0"):
        IAdvTText(neighbour_refresh=-1)
    assert SPGD().neighbour_refresh == 0 and IAdvTText(neighbour_refresh=50).neighbour_refresh == 50
