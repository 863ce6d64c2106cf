"""Text evaluation of adversarial examples: per-word perplexity under a causal language model, and attack
statistics over a data set (the evaluation protocol of SPGD, arXiv 1905.12864).

* :func:`per_word_perplexity`: ``exp(-(1/W) sum_i log p(token_i | tokens_<i))`` per text, with ``W`` the number of
  words (:func:`~lightning_robust.utils.text.basic_tokenize` tokens, punctuation included) rather than of model
  tokens, so that models with different tokenizers are comparable; any ``AutoModelForCausalLM`` (name or local
  folder), batched with padding that never changes a text's score.
* :func:`train_causal_lm`: a small GPT-2 with a word-level tokenizer, trained from scratch on given texts and saved
  with ``save_pretrained`` (no pretrained causal LM ships offline; this one is for relative comparisons).
* :func:`evaluate_text_attack`: success rate, words changed and (optionally) perplexities over a dataloader.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_robust.attacks.text import TextAttack
from lightning_robust.utils.modules import model_mode
from lightning_robust.utils.text import TextTokenizer, WordVocabulary, basic_tokenize
from lightning_robust.utils.validation import check_positive_int

__all__ = [
    "evaluate_text_attack",
    "load_causal_lm",
    "load_word_lm",
    "per_word_perplexity",
    "sliding_windows",
    "train_causal_lm",
    "train_word_lm",
]


def load_causal_lm(name_or_path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a Hugging Face name or a local folder (``save_pretrained`` output), in eval mode.

    A tokenizer without a pad token gets its EOS (or UNK) token as padding (padding is masked anyway).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model: nn.Module = AutoModelForCausalLM.from_pretrained(str(name_or_path))
    return model.to(device).eval(), tokenizer


def _max_positions(model: nn.Module) -> int | None:
    value = getattr(model, "max_positions", None)
    if isinstance(value, int):
        return value
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int):
            return value
    return None


def _next_token_log_probs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T - 1]`` log-probabilities of each next token (a model's own ``token_log_probs`` when it has one,
    which avoids a full softmax for adaptive-softmax models; else the log-softmax of ``.logits``)."""
    own = getattr(model, "token_log_probs", None)
    if callable(own):
        return own(ids, mask).float()
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return -F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that score a sequence of ``n_tokens`` tokens (token 0 is given, tokens 1.. are scored).

    Window ``k`` covers tokens ``[start_k, end_k)`` with ``start_k = k * stride`` and ``end_k = min(start_k +
    context, n_tokens)``; it scores the tokens from the previous window's end (1 for the first window) to its own
    end, so every token from 1 on is scored exactly once, and a token scored by window ``k > 0`` sees at least
    ``context - stride`` earlier tokens. A sequence that fits the context is one window (nothing changes).

    Returns:
        ``[(start, end, first_scored), ...]``.
    """
    check_positive_int("context", context, minimum=2)
    check_positive_int("stride", stride)
    if stride >= context:
        raise ValueError(f"stride must be smaller than context={context} so that windows overlap, got {stride}")
    out = [(0, min(context, n_tokens), 1)]
    while out[-1][1] < n_tokens:
        start = out[-1][0] + stride
        out.append((start, min(start + context, n_tokens), out[-1][1]))
    return out


@torch.no_grad()
def per_word_perplexity(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16,
                        max_length: int | None = None, stride: int | None = None) -> torch.Tensor:
    """Per-word perplexity of each whole text under a causal LM: ``exp(NLL(text) / #words)``.

    The text is tokenized without special tokens and the tokenizer's BOS token (when it has one) is prepended
    so that the first token is scored too. A text longer than the context (``max_length`` tokens, default the
    model's) is scored with overlapping sliding windows (:func:`sliding_windows`): windows start every
    ``stride`` tokens (default ``max_length // 2``), each scores only the tokens past the previous window's
    end, so every token is scored once and with at least ``max_length - stride`` tokens of context. Nothing is
    truncated: ``#words`` counts the whole text's :func:`basic_tokenize` words, and a text that fits in the
    context is scored by one forward pass exactly as without windows.

    Args:
        model: an ``AutoModelForCausalLM`` (returns ``.logits`` [B, T, V]) or any module with
            ``token_log_probs(input_ids, attention_mask) -> [B, T - 1]`` (e.g.
            :class:`~lightning_robust.nets.WordLanguageModel`).
        tokenizer: its tokenizer.
        texts: the texts.
        batch_size: windows per forward pass (right padding, masked; the result does not depend on it).
        max_length: window length in tokens (BOS included).
        stride: tokens between window starts, in ``[1, max_length)``.

    Returns:
        ``[N]`` float64 perplexities (``nan`` for a text with no word).
    """
    check_positive_int("batch_size", batch_size)
    device = next(model.parameters()).device
    limit = max_length or _max_positions(model) or 1024
    check_positive_int("max_length", limit, minimum=2)
    stride = limit // 2 if stride is None else stride
    bos = getattr(tokenizer, "bos_token_id", None)
    out = torch.full((len(texts),), float("nan"), dtype=torch.float64)
    # (text index, window token ids, index within the window of the first scored token)
    rows: list[tuple[int, list[int], int]] = []
    words = []
    for i, text in enumerate(texts):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if bos is not None:
            ids = [int(bos), *ids]
        words.append(len(basic_tokenize(text)))
        if len(ids) < 2:
            continue
        for start, end, first in sliding_windows(len(ids), limit, stride):
            rows.append((i, ids[start:end], first - start))
    nll = [0.0] * len(texts)
    with model_mode(model, "eval"):
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo: lo + batch_size]
            T = max(len(r[1]) for r in chunk)
            batch = torch.zeros(len(chunk), T, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.long)
            scored = torch.zeros(len(chunk), T - 1, dtype=torch.float64)
            for j, (_, ids, first) in enumerate(chunk):
                batch[j, : len(ids)] = torch.tensor(ids)
                mask[j, : len(ids)] = 1
                scored[j, first - 1: len(ids) - 1] = 1  # target t is predicted at position t - 1
            logp = _next_token_log_probs(model, batch.to(device), mask.to(device)).double().cpu()
            for j, value in enumerate((-logp * scored).sum(1).tolist()):
                nll[chunk[j][0]] += value
        for i, (n, w) in enumerate(zip(nll, words)):
            out[i] = math.exp(n / w) if w > 0 else float("nan")
    return out


def _word_level_tokenizer(vocab: WordVocabulary) -> Any:
    """A ``PreTrainedTokenizerFast`` splitting text exactly like :func:`basic_tokenize`, over ``vocab``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*vocab.words, "<bos>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"<[bB][rR]\s*/?>"), " "),
                                           normalizers.Lowercase()])
    pattern = r"[a-z0-9]+(?=n't)|n't|'[a-z]+|[a-z0-9]+|[^\sa-z0-9]"
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex(pattern), behavior="isolated")])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<bos>")


def train_causal_lm(texts: Sequence[str], out_dir: str | Path, vocab_size: int = 20000, max_length: int = 128,
                    n_layer: int = 2, n_embd: int = 128, n_head: int = 4, steps: int = 1000, batch_size: int = 32,
                    lr: float = 3e-3, seed: int = 0, vocabulary: WordVocabulary | None = None,
                    log_every: int = 0) -> Path:
    """Train a small GPT-2 language model from scratch on ``texts`` and ``save_pretrained`` it into ``out_dir``.

    The tokenizer is word level (the ``vocab_size`` most frequent :func:`basic_tokenize` tokens of ``texts``, or
    the given ``vocabulary``, e.g. the classifier's, so that every word an attack can produce is in the LM's
    vocabulary), so its per-token perplexity is the per-word perplexity. Each step draws a batch of random
    windows of ``max_length`` tokens from the concatenated, ``<bos>``-separated texts; AdamW, linear decay.

    Returns:
        ``out_dir``, loadable with :func:`load_causal_lm`.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    check_positive_int("steps", steps)
    check_positive_int("max_length", max_length, minimum=2)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vocab = vocabulary if vocabulary is not None else WordVocabulary.build(texts, max_size=vocab_size)
    tokenizer = _word_level_tokenizer(vocab)
    bos = tokenizer.bos_token_id
    stream: list[int] = []
    for text in texts:
        stream.append(bos)
        stream.extend(vocab.encode(text))
    data = torch.tensor(stream, dtype=torch.long)
    if len(data) <= max_length + 1:
        raise ValueError(f"texts hold {len(data)} tokens, fewer than one window of max_length={max_length}")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=max_length, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=bos, eos_token_id=bos, pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.0, 1 - s / steps))
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(data) - max_length - 1, (batch_size,), generator=g)
        batch = torch.stack([data[s: s + max_length] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  LM step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    out = Path(out_dir)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _token_stream(texts: Sequence[str], vocab: WordVocabulary, bos: int) -> torch.Tensor:
    stream: list[int] = []
    for text in texts:
        stream.append(bos)
        stream.extend(vocab.encode(text))
    return torch.tensor(stream, dtype=torch.long)


def train_word_lm(texts: Sequence[str], heldout: Sequence[str], vocabulary: WordVocabulary, out_dir: str | Path,
                  context: int = 256, dim: int = 128, layers: int = 2, heads: int = 4, ff: int = 512,
                  cutoffs: Sequence[int] = (2000, 8000), dropout: float = 0.1, batch_size: int = 16,
                  lr: float = 2e-3, max_steps: int = 4000, eval_every: int = 200, patience: int = 2,
                  eval_windows: int = 64, seed: int = 0, log: Any = None,
                  init_from: str | Path | None = None, min_rel_improvement: float = 0.0) -> dict[str, Any]:
    """Train a :class:`~lightning_robust.nets.WordLanguageModel` until its held-out perplexity stops improving.

    The tokenizer is word level over ``vocabulary`` (plus ``<bos>``), so per-token perplexity is per-word
    perplexity. Each step draws ``batch_size`` random windows of ``context`` tokens from the concatenated,
    ``<bos>``-separated ``texts``; AdamW with warm-up. Every ``eval_every`` steps the per-word perplexity of
    ``eval_windows`` fixed, non-overlapping windows of the ``heldout`` texts is measured; training stops when
    it has not improved for ``patience`` evaluations (or at ``max_steps``), and the best weights are saved.
    An evaluation improves when its perplexity is below ``best · (1 - min_rel_improvement)`` (and ``best - 1e-3``);
    ``best`` and its weights change only then, as with Lightning's ``EarlyStopping(min_delta=...)``. With the
    default 0 any decrease counts, which a small model on a large corpus keeps making for thousands of steps
    (its held-out evaluation is deterministic); a tolerance such as 0.005 stops once ``patience`` evaluations
    in a row bring less than 0.5% each.

    ``init_from`` (a folder saved by this function, with the same architecture) continues from its weights with a
    fresh optimiser, e.g. at a lower learning rate once a constant-rate run has slowed (a step decay); the
    held-out perplexity of those weights is evaluated first (step 0), so the continuation keeps them unless it
    improves on them.

    Returns:
        ``{"path", "heldout_ppl" (best), "steps", "stopped" ("plateau" or "max_steps"), "history" [(step, ppl)],
        "seconds"}``; load the model with :func:`load_word_lm`.
    """
    from lightning_robust.nets.word_lm import WordLanguageModel

    check_positive_int("max_steps", max_steps)
    check_positive_int("eval_every", eval_every)
    check_positive_int("patience", patience)
    if not (isinstance(min_rel_improvement, (int, float)) and 0.0 <= float(min_rel_improvement) < 1.0):
        raise ValueError(f"min_rel_improvement must be a number in [0, 1), got {min_rel_improvement!r}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tokenizer = _word_level_tokenizer(vocabulary)
    bos = int(tokenizer.bos_token_id)
    data = _token_stream(texts, vocabulary, bos)
    held = _token_stream(heldout, vocabulary, bos)
    if len(data) <= context + 1 or len(held) < context:
        raise ValueError(f"texts / heldout hold {len(data)} / {len(held)} tokens, fewer than one window of "
                         f"context={context}")
    n_eval = min(eval_windows, len(held) // context)
    held_batch = held[: n_eval * context].view(n_eval, context)
    model = WordLanguageModel(len(tokenizer), context=context, dim=dim, layers=layers, heads=heads, ff=ff,
                              cutoffs=cutoffs, dropout=dropout)
    if init_from is not None:
        folder = Path(init_from)
        saved = json.loads((folder / "lm_config.json").read_text()) if (folder / "lm_config.json").is_file() else None
        if saved != json.loads(json.dumps(model.config)):
            raise ValueError(f"init_from={str(folder)!r} must hold a train_word_lm model with this architecture "
                             f"{model.config}, found {saved}")
        model.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))

    @torch.no_grad()
    def heldout_ppl() -> float:
        model.eval()
        nll = torch.cat([-model.token_log_probs(b) for b in held_batch.split(16)]).double().mean()
        model.train()
        return math.exp(float(nll))

    best, best_state, bad, history = float("inf"), None, 0, []
    if init_from is not None:
        best = heldout_ppl()
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append((0, best))
    stopped = "max_steps"
    t0 = time.perf_counter()
    model.train()
    step = 0
    for step in range(1, max_steps + 1):
        starts = torch.randint(0, len(data) - context, (batch_size,), generator=g)
        batch = torch.stack([data[s: s + context] for s in starts.tolist()])
        loss = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == max_steps:
            ppl = heldout_ppl()
            history.append((step, ppl))
            if log is not None:
                log(f"  LM step {step}: train loss {loss.item():.3f}, held-out ppl {ppl:.1f} "
                    f"({time.perf_counter() - t0:.0f}s)")
            if ppl < min(best - 1e-3, best * (1.0 - min_rel_improvement)):
                best, bad = ppl, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= patience:
                    stopped = "plateau"
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "weights.pt")
    (out / "lm_config.json").write_text(json.dumps(model.config))
    tokenizer.save_pretrained(out)
    info = {"path": str(out), "heldout_ppl": best, "steps": step, "stopped": stopped, "history": history,
            "seconds": time.perf_counter() - t0, "heldout_tokens": int(held_batch.numel())}
    (out / "train_info.json").write_text(json.dumps(info))
    return info


def load_word_lm(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` saved by :func:`train_word_lm`, weights loaded with ``weights_only=True``."""
    from transformers import AutoTokenizer

    from lightning_robust.nets.word_lm import WordLanguageModel

    folder = Path(path)
    cfg_file = folder / "lm_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder} holds no lm_config.json (expected the output of train_word_lm)")
    model = WordLanguageModel(**json.loads(cfg_file.read_text()))
    model.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    return model.to(device).eval(), AutoTokenizer.from_pretrained(str(folder))


def evaluate_text_attack(attack: TextAttack, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                         tokenizer: TextTokenizer | None = None, lm: tuple[nn.Module, Any] | None = None,
                         max_batches: int | None = None, device: str | torch.device | None = None,
                         lm_batch_size: int = 16) -> dict[str, Any]:
    """Run ``attack`` over dict batches (``input_ids``, ``attention_mask``, ``labels``) and aggregate.

    Returns a dict with ``success_rate`` (over clean-correct reviews), ``words_changed`` (mean over successful
    adversarial examples), ``fraction_changed``, ``clean_acc``, ``adv_acc``, ``n``, ``seconds``, the per-example
    ``results`` list of :class:`~lightning_robust.attacks.TextAttackResult`, and, with a tokenizer and ``lm =
    (model, tokenizer)``, ``ppl_original`` / ``ppl_adversarial`` (mean per-word perplexity of the successful
    examples' clean and adversarial texts) with the per-text tensors ``ppl_original_all`` / ``ppl_adversarial_all``.
    """
    results = []
    t0 = time.perf_counter()
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        b = {k: v.to(device) if device is not None else v for k, v in batch.items()}
        results.append(attack(model, b["input_ids"], b["labels"], b.get("attention_mask"), tokenizer=tokenizer))
    seconds = time.perf_counter() - t0
    if not results:
        raise ValueError("batches yielded nothing to attack")
    ok = torch.cat([r.clean_correct for r in results])
    success = torch.cat([r.success for r in results])
    changed = torch.cat([r.num_changed for r in results]).float()
    lengths = torch.cat([r.attention_mask.sum(1) for r in results]).float()
    won = ok & success
    out: dict[str, Any] = {
        "n": int(ok.numel()),
        "clean_acc": float(ok.float().mean()),
        "adv_acc": float((ok & ~success).float().mean()),
        "success_rate": float(won.sum()) / max(int(ok.sum()), 1),
        "words_changed": float(changed[won].mean()) if bool(won.any()) else float("nan"),
        "fraction_changed": float((changed[won] / lengths[won]).mean()) if bool(won.any()) else float("nan"),
        "seconds": seconds,
        "results": results,
    }
    if lm is not None and tokenizer is not None and bool(won.any()):
        orig = [t for r in results for t in (r.original_text or [])]
        adv = [t for r in results for t in (r.text or [])]
        idx = won.nonzero().flatten().tolist()
        p0 = per_word_perplexity(lm[0], lm[1], [orig[i] for i in idx], batch_size=lm_batch_size)
        p1 = per_word_perplexity(lm[0], lm[1], [adv[i] for i in idx], batch_size=lm_batch_size)
        out.update(ppl_original=float(p0.mean()), ppl_adversarial=float(p1.mean()),
                   ppl_original_all=p0, ppl_adversarial_all=p1)
    return out
