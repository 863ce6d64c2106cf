"""Per-word perplexity against Hugging Face's own loss, the small trained LM, and attack aggregation."""

import math
import random

import pytest
import torch

from lightning_robust.attacks import SPGD
from lightning_robust.metrics import (
    evaluate_text_attack,
    load_causal_lm,
    load_word_lm,
    per_word_perplexity,
    sliding_windows,
    train_causal_lm,
    train_word_lm,
)
from lightning_robust.metrics.perplexity import _word_level_tokenizer
from lightning_robust.nets import WordLanguageModel
from lightning_robust.utils.text import WordVocabulary, basic_tokenize
from tests.attacks.test_spgd import BagNet, _batch
from tests.helpers.imdb import synthetic_review

TEXTS = ["The movie was good.", "A bad, bad film!<br />I didn't like it", "plot", "it's the story of a director"]


def _tiny_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = WordVocabulary.build(TEXTS)
    tok = _word_level_tokenizer(vocab)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.bos_token_id)
    return GPT2LMHeadModel(cfg).eval(), tok


def test_word_level_tokenizer_splits_like_basic_tokenize():
    _, tok = _tiny_lm()
    for text in TEXTS:
        assert tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"]) == basic_tokenize(text)


def test_batched_perplexity_matches_the_models_own_loss():
    model, tok = _tiny_lm()
    got = per_word_perplexity(model, tok, TEXTS, batch_size=3)
    for text, value in zip(TEXTS, got.tolist()):
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            mean_nll = model(input_ids=ids, labels=ids).loss.item()  # mean over the len - 1 predicted tokens
        words = len(basic_tokenize(text))
        assert words == ids.shape[1] - 1  # word-level LM: per-word = per-token
        assert value == pytest.approx(math.exp(mean_nll * (ids.shape[1] - 1) / words), rel=1e-4)
    assert torch.allclose(got, per_word_perplexity(model, tok, TEXTS, batch_size=1))


def _token_logp_brute_force(model, ids, context, stride):
    """log p(token t | its window) for t >= 1, the window of token t written out independently of the library:
    tokens 1 .. context-1 are scored from position 0, token t >= context from the window starting at
    stride * ((t - context + stride) // stride)."""
    out = []
    for t in range(1, len(ids)):
        start = 0 if t < context else stride * ((t - context + stride) // stride)
        assert t - start >= context - stride or start == 0  # at least context - stride tokens of context
        window = torch.tensor([ids[start: t]])  # the tokens before t in its window; the last position predicts t
        with torch.no_grad():
            logits = model(input_ids=window).logits[0, -1]
        out.append(float(torch.log_softmax(logits.double(), -1)[ids[t]]))
    return out


def test_long_texts_are_scored_whole_with_overlapping_windows():
    model, tok = _tiny_lm()
    words = ["the", "movie", "was", "good", "a", "bad", "film", "plot", "story", "director", "it", "like"]
    rng = random.Random(0)
    text = " ".join(rng.choice(words) for _ in range(45))  # 46 tokens with <bos>: 5 windows of 10, stride 7
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    want = math.exp(-sum(_token_logp_brute_force(model, ids, 10, 7)) / len(basic_tokenize(text)))
    got = per_word_perplexity(model, tok, [text, text], max_length=10, stride=7, batch_size=3)
    assert got.tolist() == pytest.approx([want, want], rel=1e-6)
    # Changing a word far beyond the first context changes the score (it used to be silently truncated).
    changed = text.split()
    changed[40] = "director" if changed[40] != "director" else "plot"
    assert per_word_perplexity(model, tok, [" ".join(changed)], max_length=10, stride=7).item() != pytest.approx(
        got[0].item(), rel=1e-9)


def test_text_within_the_context_is_one_window_and_scores_as_before():
    model, tok = _tiny_lm()
    for text in TEXTS:
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
        want = math.exp(-sum(_token_logp_brute_force(model, ids, 32, 16)) / len(basic_tokenize(text)))
        # default window = the model's context (32), which every text here fits: nothing depends on the stride
        for stride in (None, 1, 31):
            assert per_word_perplexity(model, tok, [text], stride=stride).item() == pytest.approx(want, rel=1e-6)


def test_sliding_windows_cover_every_token_once():
    for n, c, s in ((5, 10, 5), (10, 10, 5), (11, 10, 5), (46, 10, 7), (100, 8, 1)):
        wins = sliding_windows(n, c, s)
        scored = [t for start, end, first in wins for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - start <= c and first - start >= (0 if k == 0 else c - s)
                   for k, (start, end, first) in enumerate(wins))
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(20, 10, 10)


def test_word_lm_perplexity_uses_its_exact_adaptive_softmax_log_probs():
    vocab = WordVocabulary.build(TEXTS * 3 + ["x" + str(i) for i in range(40)])
    tok = _word_level_tokenizer(vocab)
    torch.manual_seed(0)
    lm = WordLanguageModel(len(tok), context=8, dim=16, layers=1, heads=2, ff=32, cutoffs=(10, 30)).eval()
    text = TEXTS[1] + " " + TEXTS[3]
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    nll = 0.0
    for t in range(1, len(ids)):
        start = 0 if t < 8 else 4 * ((t - 8 + 4) // 4)
        with torch.no_grad():
            h = lm.hidden(torch.tensor([ids[start: t]]))[0, -1:]
            nll -= float(lm.out.log_prob(h)[0, ids[t]])  # the full normalised distribution
    want = math.exp(nll / len(basic_tokenize(text)))
    assert per_word_perplexity(lm, tok, [text], stride=4).item() == pytest.approx(want, rel=1e-5)
    # Causality: changing a later token leaves earlier log-probabilities unchanged.
    x = torch.tensor([ids[:8]])
    y = x.clone()
    y[0, 6] = 5
    with torch.no_grad():
        assert torch.allclose(lm.token_log_probs(x)[0, :5], lm.token_log_probs(y)[0, :5], atol=1e-6)


def test_train_word_lm_early_stops_and_reloads(tmp_path):
    rng = random.Random(0)
    texts = [synthetic_review(i % 2, rng, length=10) for i in range(120)]
    vocab = WordVocabulary.build(texts, max_size=60)
    info = train_word_lm(texts[:100], texts[100:], vocab, tmp_path / "lm", context=16, dim=16, layers=1, heads=2,
                         ff=32, cutoffs=(10, 30), batch_size=8, lr=1e-2, max_steps=150, eval_every=10, patience=2)
    ppls = [p for _, p in info["history"]]
    assert info["heldout_ppl"] == pytest.approx(min(ppls)) and info["heldout_ppl"] < 40
    if info["stopped"] == "plateau":
        assert ppls[-1] >= info["heldout_ppl"] - 1e-3 and ppls[-2] >= info["heldout_ppl"] - 1e-3
    lm, tok = load_word_lm(tmp_path / "lm")
    # the saved model is the best one: its held-out perplexity is the reported one
    held = []
    for t in texts[100:]:
        held.extend([tok.bos_token_id, *vocab.encode(t)])
    n = len(held) // 16
    with torch.no_grad():
        logp = lm.token_log_probs(torch.tensor(held[: n * 16]).view(n, 16))
    assert math.exp(float(-logp.double().mean())) == pytest.approx(info["heldout_ppl"], rel=1e-4)


def test_trained_lm_prefers_real_word_order(tmp_path):
    rng = random.Random(0)
    texts = [synthetic_review(i % 2, rng, length=10) for i in range(200)]
    path = train_causal_lm(texts, tmp_path / "lm", vocab_size=100, max_length=32, n_layer=1, n_embd=32, n_head=2,
                           steps=120, batch_size=16, lr=1e-2)
    model, tok = load_causal_lm(path)
    test = [synthetic_review(1, rng, length=10) for _ in range(20)]
    shuffled = []
    for t in test:
        words = basic_tokenize(t)
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    real = per_word_perplexity(model, tok, test).mean()
    assert real < 0.7 * per_word_perplexity(model, tok, shuffled).mean()
    assert real < 30  # far below the ~40-word vocabulary's uniform perplexity


def test_evaluate_text_attack_aggregates_batches():
    net = BagNet()
    ids, mask, y = _batch()
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": y}] * 3
    out = evaluate_text_attack(SPGD(max_words=1, threshold=0.0, steps=10, alpha=0.2), net, batches, max_batches=2)
    assert out["n"] == 4 and len(out["results"]) == 2
    assert out["success_rate"] == 1.0 and out["words_changed"] == 1.0 and out["clean_acc"] == 1.0
    assert out["adv_acc"] == 0.0


def test_train_word_lm_continues_from_saved_weights(tmp_path):
    rng = random.Random(1)
    texts = [synthetic_review(i % 2, rng, length=10) for i in range(120)]
    vocab = WordVocabulary.build(texts, max_size=60)
    arch = dict(context=16, dim=16, layers=1, heads=2, ff=32, cutoffs=(10, 30))
    first = train_word_lm(texts[:100], texts[100:], vocab, tmp_path / "a", batch_size=8, lr=1e-2, max_steps=40,
                          eval_every=10, patience=5, **arch)
    # step 0 of the continuation is the saved model itself; at a vanishing learning rate nothing improves on it
    again = train_word_lm(texts[:100], texts[100:], vocab, tmp_path / "b", batch_size=8, lr=1e-9, max_steps=20,
                          eval_every=10, patience=2, init_from=tmp_path / "a", **arch)
    assert again["history"][0][0] == 0
    assert again["history"][0][1] == pytest.approx(first["heldout_ppl"], rel=1e-5)
    assert again["heldout_ppl"] == pytest.approx(first["heldout_ppl"], rel=1e-4)
    with pytest.raises(ValueError, match="init_from"):
        train_word_lm(texts[:100], texts[100:], vocab, tmp_path / "c", max_steps=1, init_from=tmp_path / "a",
                      **{**arch, "dim": 32})


def test_train_word_lm_relative_tolerance_keeps_the_best_weights_until_an_improvement_exceeds_it(tmp_path):
    rng = random.Random(2)
    texts = [synthetic_review(i % 2, rng, length=10) for i in range(120)]
    vocab = WordVocabulary.build(texts, max_size=60)
    arch = dict(context=16, dim=16, layers=1, heads=2, ff=32, cutoffs=(10, 30))
    kw = dict(batch_size=8, lr=1e-2, eval_every=5, **arch)
    first = train_word_lm(texts[:100], texts[100:], vocab, tmp_path / "a", max_steps=10, patience=5, **kw)
    free = train_word_lm(texts[:100], texts[100:], vocab, tmp_path / "b", max_steps=30, patience=10,
                         init_from=tmp_path / "a", **kw)
    ppl = [p for _, p in free["history"]]
    assert ppl[0] == pytest.approx(first["heldout_ppl"], rel=1e-5) and min(ppl[1:]) < ppl[0]  # it keeps improving
    # A tolerance just above the continuation's largest relative gain over step 0: no evaluation counts, so the
    # run stops after `patience` evaluations and keeps the weights it started from (Lightning's min_delta rule).
    tol = 1 - min(ppl[1:]) / ppl[0] + 1e-3
    held = train_word_lm(texts[:100], texts[100:], vocab, tmp_path / "c", max_steps=30, patience=2,
                         init_from=tmp_path / "a", min_rel_improvement=tol, **kw)
    assert held["stopped"] == "plateau" and held["steps"] == 10
    assert [h for h in held["history"]] == [h for h in free["history"][:3]]  # the same run until it stops
    assert held["heldout_ppl"] == pytest.approx(ppl[0], rel=1e-6)
    a = torch.load(tmp_path / "a" / "weights.pt", weights_only=True)
    c = torch.load(tmp_path / "c" / "weights.pt", weights_only=True)
    assert all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="min_rel_improvement"):
        train_word_lm(texts[:100], texts[100:], vocab, tmp_path / "d", max_steps=1, min_rel_improvement=1.0, **arch)
