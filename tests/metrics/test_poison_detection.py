"""PoisonDetection against scikit-learn's metrics, batch accumulation and zero-division conventions."""

import pytest
import torch
from sklearn.metrics import f1_score, matthews_corrcoef, precision_score, recall_score

from lightning_robust.metrics import PoisonDetection, poison_detection_scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_scikit_learn(seed):
    g = torch.Generator().manual_seed(seed)
    poisoned = torch.rand(200, generator=g) < 0.1
    removed = torch.where(torch.rand(200, generator=g) < 0.8, poisoned, torch.rand(200, generator=g) < 0.1)
    s = poison_detection_scores(removed, poisoned)
    yt, yp = poisoned.numpy(), removed.numpy()
    assert float(s["precision"]) == pytest.approx(precision_score(yt, yp, zero_division=0))
    assert float(s["recall"]) == pytest.approx(recall_score(yt, yp, zero_division=0))
    assert float(s["detection_rate"]) == float(s["recall"])
    assert float(s["f1"]) == pytest.approx(f1_score(yt, yp, zero_division=0))
    assert float(s["mcc"]) == pytest.approx(matthews_corrcoef(yt, yp))
    assert int(s["clean_removed"]) == int((removed & ~poisoned).sum())
    assert float(s["false_positive_rate"]) == pytest.approx(float((removed & ~poisoned).sum() / (~poisoned).sum()))


def test_metric_accumulates_batches_like_one_call():
    g = torch.Generator().manual_seed(4)
    poisoned = torch.rand(300, generator=g) < 0.2
    removed = torch.rand(300, generator=g) < 0.3
    metric = PoisonDetection()
    for r, p in zip(removed.split(64), poisoned.split(64)):
        metric.update(r, p)
    whole = poison_detection_scores(removed, poisoned)
    for key, value in metric.compute().items():
        assert torch.allclose(value, whole[key]), key


def test_perfect_and_degenerate_filters():
    poisoned = torch.tensor([True, True, False, False, False])
    perfect = poison_detection_scores(poisoned, poisoned)
    assert all(float(perfect[k]) == 1.0 for k in ("detection_rate", "precision", "f1", "mcc"))
    nothing = poison_detection_scores(torch.zeros(5, dtype=torch.bool), poisoned)
    assert float(nothing["precision"]) == 0.0 and float(nothing["mcc"]) == 0.0 and float(nothing["f1"]) == 0.0
    with pytest.raises(ValueError, match="removed and poisoned must have the same shape"):
        poison_detection_scores(poisoned[:3], poisoned)


@pytest.mark.parametrize("seed", [0, 1])
def test_counts_match_scikit_learn_confusion_matrix_and_metric_matches_function(seed):
    from sklearn.metrics import confusion_matrix

    g = torch.Generator().manual_seed(seed)
    poisoned = torch.rand(150, generator=g) < 0.3
    removed = torch.rand(150, generator=g) < 0.4
    tn, fp, fn, tp = confusion_matrix(poisoned.numpy(), removed.numpy(), labels=[False, True]).ravel()
    s = poison_detection_scores(removed, poisoned)
    assert (int(s["poisons_removed"]), int(s["clean_removed"]), int(s["poisons_kept"])) == (tp, fp, fn)
    assert float(s["false_positive_rate"]) == pytest.approx(fp / (fp + tn))
    metric = PoisonDetection()
    metric.update(removed[:70], poisoned[:70])
    metric.update(removed[70:], poisoned[70:])
    assert {k: float(v) for k, v in metric.compute().items()} == pytest.approx({k: float(v) for k, v in s.items()})


def test_all_poisoned_and_all_removed_has_no_false_positives():
    everything = torch.ones(4, dtype=torch.bool)
    s = poison_detection_scores(everything, everything)
    assert float(s["false_positive_rate"]) == 0.0 and float(s["recall"]) == 1.0
    metric = PoisonDetection()
    metric.update(everything, everything)
    assert float(metric.compute()["false_positive_rate"]) == 0.0
