"""Weighted k-NN against a float64 reference written here from SPEC §2.5 (DINO's k-NN weighting), and feature
extraction."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinokernels.eval.knn import extract_features, knn_accuracy, knn_classifier


def weighted_knn_reference(train_features, train_labels, test_features, test_labels, k, T, num_classes):
    """Top-1 and top-5 accuracy in percent, float64. For each test row: the k train rows of largest dot product
    (the features are L2-normalised: cosine similarity s) each vote exp(s/T) for their label; classes are ranked
    by their total vote, descending, equal totals (in particular the classes without votes) in ascending class
    order; top-5 looks at the first min(5, k, num_classes) ranks."""
    sims = test_features.double() @ train_features.double().T  # (M, N)
    top_sims, top_index = sims.topk(k, dim=1, largest=True, sorted=True)
    votes = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64)
    votes.scatter_add_(1, train_labels[top_index], torch.exp(top_sims / T))
    ranking = votes.sort(dim=1, descending=True, stable=True).indices
    hits = ranking == test_labels[:, None]
    top1 = int(hits[:, 0].sum())
    top5 = int(hits[:, :min(5, k, num_classes)].any(dim=1).sum())
    total = test_labels.shape[0]
    return top1 * 100.0 / total, top5 * 100.0 / total


def _clustered(n, d, classes, noise, g):
    centers = torch.randn(classes, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = centers[labels] + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return F.normalize(x, dim=1), labels


@pytest.mark.parametrize("n_train,n_test,d,classes,k,T,noise", [
    (500, 230, 16, 10, 20, 0.07, 1.5), (300, 57, 8, 7, 10, 0.07, 2.0), (200, 150, 32, 12, 1, 0.5, 3.0),
    (120, 333, 4, 6, 100, 0.07, 1.0)])
def test_matches_reference_float64(n_train, n_test, d, classes, k, T, noise):
    g = torch.Generator().manual_seed(n_train + k)
    ftr, ltr = _clustered(n_train, d, classes, noise, g)
    fte, lte = _clustered(n_test, d, classes, noise, g)
    ours = knn_classifier(ftr, ltr, fte, lte, k=k, T=T, num_classes=classes, chunk_size=37)
    ref = weighted_knn_reference(ftr, ltr, fte, lte, k, T, num_classes=classes)
    assert ours == ref
    assert 0 < ours[0] < 100 and ours[0] <= ours[1]  # neither trivial nor impossible
    # float32 (what the trainer uses) agrees on these well-separated votes, and the fraction helper matches
    ours32 = knn_classifier(ftr.float(), ltr, fte.float(), lte, k=k, T=T, num_classes=classes)
    assert abs(ours32[0] - ref[0]) <= 100.0 / n_test + 1e-9
    assert knn_accuracy(ftr, ltr, fte, lte, k=k, T=T) == pytest.approx(ours32[0] / 100, abs=1.0 / n_test + 1e-9)


def test_weighting_breaks_a_majority():
    """Two close neighbours of class 1 outvote three far ones of class 0 with exp(sim/T) weights."""
    train = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.05, 1.0], [0.02, 1.0]]), dim=1)
    labels = torch.tensor([1, 1, 0, 0, 0])
    test = F.normalize(torch.tensor([[1.0, 0.4]]), dim=1)
    assert knn_classifier(train, labels, test, torch.tensor([1]), k=5, T=0.07)[0] == 100.0
    assert knn_classifier(train, labels, test, torch.tensor([1]), k=5, T=100.0)[0] == 0.0  # ~unweighted majority


def test_extract_features_normalised_eval_mode_restored():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Dropout(0.5))
    model.train()
    data = [(torch.randn(4, 3, 2, 2), torch.arange(4)), (torch.randn(3, 3, 2, 2), [4, 5, 6])]
    f, labels = extract_features(model, data)
    assert f.shape == (7, 5) and labels.tolist() == list(range(7)) and model.training
    torch.testing.assert_close(f.norm(dim=1), torch.ones(7))
    f2, _ = extract_features(model, data)
    assert torch.equal(f, f2)  # dropout off: deterministic


def test_bad_input():
    with pytest.raises(ValueError, match="features"):
        knn_classifier(torch.randn(4, 3), torch.zeros(4), torch.randn(2, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="T"):
        knn_classifier(torch.randn(4, 3), torch.zeros(4), torch.randn(2, 3), torch.zeros(2), T=0)
