"""Evaluation of pretrained features: weighted k-NN (DINO's eval_knn), a linear probe, the pretraining report
(learned vs random initialisation vs raw pixels, teacher-output entropy) and attention-map pictures."""
from .attention import attention_grid, cls_attention_maps, visualize_attention
from .knn import extract_features, knn_accuracy, knn_classifier
from .linear import linear_probe
from .loading import load_backbone
from .report import evaluate_features, evaluate_pretraining, format_table, teacher_entropy

__all__ = ["extract_features", "knn_classifier", "knn_accuracy", "linear_probe", "cls_attention_maps",
           "attention_grid", "visualize_attention", "load_backbone", "evaluate_features", "evaluate_pretraining",
           "format_table", "teacher_entropy"]
