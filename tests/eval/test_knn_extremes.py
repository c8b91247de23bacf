"""k-NN vote at extreme temperatures: the ranking must be that of the float64 exp(s/T) vote for any T > 0
(exp(s/0.01) overflows float32 when computed directly)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dinokernels.eval.knn import knn_classifier


def float64_vote_accuracy(train, train_labels, test, test_labels, k, T, num_classes):
    """Top-1 in percent with exp(s/T) weights summed per class in float64 Python arithmetic (log-space to
    keep exp(s/T) representable: the class with the largest log-sum-exp of its neighbours' s/T wins)."""
    hits = 0
    sims = test.double() @ train.double().t()
    for i in range(test.shape[0]):
        vals, idx = sims[i].topk(k)
        per_class = {}
        for v, j in zip(vals.tolist(), idx.tolist()):
            per_class.setdefault(int(train_labels[j]), []).append(v / T)
        score = {c: max(xs) + math.log(sum(math.exp(x - max(xs)) for x in xs)) for c, xs in per_class.items()}
        best = max(sorted(score), key=lambda c: score[c])
        hits += int(best == int(test_labels[i]))
    return hits * 100.0 / test.shape[0]


@pytest.mark.parametrize("T", [0.001, 0.01, 0.07, 10.0])
def test_small_temperatures_rank_like_float64(T):
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    train_labels = torch.randint(0, 4, (300,), generator=g)
    test_labels = torch.randint(0, 4, (80,), generator=g)
    train = F.normalize(centers[train_labels] + 0.6 * torch.randn(300, 16, generator=g), dim=1)
    test = F.normalize(centers[test_labels] + 0.6 * torch.randn(80, 16, generator=g), dim=1)
    top1, top5 = knn_classifier(train, train_labels, test, test_labels, k=20, T=T)
    assert top1 == pytest.approx(float64_vote_accuracy(train, train_labels, test, test_labels, 20, T, 4))
    assert top1 > 50 and top5 == 100.0  # 4 classes: the true class is always among the top 4 ranks
