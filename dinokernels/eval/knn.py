"""Weighted k-NN classification on frozen features (SPEC §2.5), as facebookresearch/dino eval_knn.py."""
from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["extract_features", "knn_classifier", "knn_accuracy"]


@torch.no_grad()
def extract_features(model: nn.Module, data: Iterable, device="cpu", normalize: bool = True,
                     dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
    """Runs `model` (in eval mode; a backbone returning (B, D) CLS features) over `data`, an iterable of
    (images, labels) batches (a DataLoader), and returns (features (N, D) float32 on the CPU, L2-normalised as
    DINO's k-NN evaluation does when `normalize`; labels (N,) int64). The model's training mode is restored."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, targets in data:
            images = images.to(device, non_blocking=True)
            out = model(images)
            feats.append(out.detach().to("cpu", dtype))
            labels.append(torch.as_tensor(targets).view(-1).to("cpu", torch.int64))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("extract_features: the data yielded no batch")
    features = torch.cat(feats)
    if normalize:
        features = F.normalize(features, dim=1, p=2)
    return features, torch.cat(labels)


@torch.no_grad()
def knn_classifier(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                   k: int = 20, T: float = 0.07, num_classes: Optional[int] = None,
                   chunk_size: int = 1024) -> Tuple[float, float]:
    """Top-1 and top-5 accuracy in percent, exactly as DINO's eval_knn.knn_classifier: for each test feature the k
    train features of largest dot product (features are L2-normalised, so cosine similarity) vote for their class
    with weight exp(similarity/T); classes are ranked by their summed weight (top-5 is over min(5, k) ranks).

    train_features (N, D), train_labels (N,), test_features (M, D), test_labels (M,). num_classes defaults to
    max label + 1. Test rows are processed in chunks of `chunk_size` (the official code uses M/100 per chunk; the
    result does not depend on it). k is capped at N."""
    if train_features.dim() != 2 or test_features.dim() != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"knn_classifier: features must be (N, D) and (M, D), got {tuple(train_features.shape)} "
                         f"and {tuple(test_features.shape)}")
    if train_labels.shape[0] != train_features.shape[0] or test_labels.shape[0] != test_features.shape[0]:
        raise ValueError("knn_classifier: one label per feature row is needed")
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("knn_classifier: empty train or test set")
    if not T > 0:
        raise ValueError(f"knn_classifier: T must be > 0, got {T!r}")
    k = min(int(k), train_features.shape[0])
    if k < 1:
        raise ValueError(f"knn_classifier: k must be ≥ 1, got {k}")
    train_labels = train_labels.to(train_features.device, torch.int64)
    test_labels = test_labels.to(train_features.device, torch.int64)
    test_features = test_features.to(train_features.device, train_features.dtype)
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    top1, top5, total = 0.0, 0.0, 0
    train_t = train_features.t()
    n_test = test_labels.shape[0]
    for idx in range(0, n_test, max(1, int(chunk_size))):
        features = test_features[idx:min(idx + chunk_size, n_test)]
        targets = test_labels[idx:min(idx + chunk_size, n_test)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_t)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot = torch.zeros(batch_size * k, num_classes, device=train_features.device,
                                        dtype=train_features.dtype)
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes),
                                    distances_transform.view(batch_size, -1, 1)), 1)
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k, num_classes)).sum().item()
        total += batch_size
    return top1 * 100.0 / total, top5 * 100.0 / total


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 k: int = 20, T: float = 0.07, normalize: bool = True) -> float:
    """Top-1 weighted k-NN accuracy as a fraction in [0, 1]; L2-normalises both feature sets first (idempotent for
    features from extract_features)."""
    if normalize:
        train_features = F.normalize(train_features.float(), dim=1, p=2)
        test_features = F.normalize(test_features.float(), dim=1, p=2)
    top1, _ = knn_classifier(train_features, train_labels, test_features, test_labels, k=k, T=T)
    return top1 / 100.0
