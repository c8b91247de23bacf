"""Weighted k-NN classification on frozen features (SPEC §2.5: DINO's exp(similarity/T) class vote)."""
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
    """Top-1 and top-5 accuracy in percent of DINO's weighted k-NN vote (SPEC §2.5): for each test feature the k
    train features of largest dot product (cosine similarity for L2-normalised features) vote for their class
    with weight exp(similarity/T); classes are ranked by their summed weight, top-5 over min(5, k, classes) ranks.
    The weights are evaluated relative to each row's largest similarity, so any T > 0 ranks correctly.

    train_features (N, D), train_labels (N,), test_features (M, D), test_labels (M,). num_classes defaults to
    max label + 1. Test rows are processed in chunks of `chunk_size` (the result does not depend on it). k is
    capped at N."""
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
    device = train_features.device
    train_labels = train_labels.to(device, torch.int64)
    test_labels = test_labels.to(device, torch.int64)
    test_features = test_features.to(device, train_features.dtype)
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    ranks = min(5, k, num_classes)
    hits1, hits5 = 0, 0
    step = max(1, int(chunk_size))
    for start in range(0, test_labels.shape[0], step):
        queries = test_features[start:start + step]  # (b, D)
        truth = test_labels[start:start + step]  # (b,)
        sims, nearest = (queries @ train_features.t()).topk(k, dim=1)  # (b, k), descending
        # Vote weight exp(s/T), computed as exp((s − s_max)/T): the same factor per row, so the same ranking,
        # but no overflow for small T (exp(1/0.01) is beyond float32).
        votes = ((sims - sims[:, :1]) / T).exp()
        class_votes = torch.zeros(queries.shape[0], num_classes, device=device, dtype=votes.dtype)
        class_votes.scatter_add_(1, train_labels[nearest], votes)  # (b, C) summed weight per class
        ranked = class_votes.argsort(dim=1, descending=True, stable=True)[:, :ranks]
        hit = ranked == truth[:, None]
        hits1 += int(hit[:, 0].sum())
        hits5 += int(hit.any(dim=1).sum())
    total = test_labels.shape[0]
    return hits1 * 100.0 / total, hits5 * 100.0 / total


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 k: int = 20, T: float = 0.07, normalize: bool = True) -> float:
    """Top-1 weighted k-NN accuracy as a fraction in [0, 1]; L2-normalises both feature sets first (idempotent for
    features from extract_features)."""
    if normalize:
        train_features = F.normalize(train_features.float(), dim=1, p=2)
        test_features = F.normalize(test_features.float(), dim=1, p=2)
    top1, _ = knn_classifier(train_features, train_labels, test_features, test_labels, k=k, T=T)
    return top1 / 100.0
