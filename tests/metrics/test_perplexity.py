"""Per-word perplexity against Hugging Face's own loss, the small trained LM, and attack aggregation."""

import math
import random

import pytest
import torch

from lightning_robust.attacks import SPGD
from lightning_robust.metrics import evaluate_text_attack, load_causal_lm, per_word_perplexity, train_causal_lm
from lightning_robust.metrics.perplexity import _word_level_tokenizer
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


def test_truncation_scores_the_first_tokens():
    model, tok = _tiny_lm()
    long = " ".join(["the movie was good"] * 20)
    short = " ".join(basic_tokenize(long)[:9])
    assert per_word_perplexity(model, tok, [long], max_length=10).item() == pytest.approx(
        per_word_perplexity(model, tok, [short]).item(), rel=1e-5)


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
