"""Weighted k-NN against a float64 re-implementation of facebookresearch/dino eval_knn.knn_classifier, and feature
extraction."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinokernels.eval.knn import extract_features, knn_accuracy, knn_classifier


def official_knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes=1000):
    """eval_knn.knn_classifier, verbatim but for float64 and a chunk size that also works below 100 test images."""
    top1, top5, total = 0.0, 0.0, 0
    train_features = train_features.t()
    num_test_images, num_chunks = test_labels.shape[0], 100
    imgs_per_chunk = max(1, num_test_images // num_chunks)
    retrieval_one_hot = torch.zeros(k, num_classes, dtype=torch.float64)
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_features[idx: min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_labels[idx: min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes),
                                    distances_transform.view(batch_size, -1, 1)), 1)
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k)).sum().item()
        total += targets.size(0)
    return top1 * 100.0 / total, top5 * 100.0 / total


def _clustered(n, d, classes, noise, g):
    centers = torch.randn(classes, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = centers[labels] + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return F.normalize(x, dim=1), labels


@pytest.mark.parametrize("n_train,n_test,d,classes,k,T,noise", [
    (500, 230, 16, 10, 20, 0.07, 1.5), (300, 57, 8, 7, 10, 0.07, 2.0), (200, 150, 32, 12, 1, 0.5, 3.0),
    (120, 333, 4, 6, 100, 0.07, 1.0)])
def test_matches_official_float64(n_train, n_test, d, classes, k, T, noise):
    g = torch.Generator().manual_seed(n_train + k)
    ftr, ltr = _clustered(n_train, d, classes, noise, g)
    fte, lte = _clustered(n_test, d, classes, noise, g)
    ours = knn_classifier(ftr, ltr, fte, lte, k=k, T=T, num_classes=classes, chunk_size=37)
    ref = official_knn_classifier(ftr, ltr, fte, lte, k, T, num_classes=classes)
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
