"""Frozen features at work (issue 14): one loader for every backbone checkpoint (`load_feature_model`), resumable
sharded embedding of image folders (`embed_folder`, `load_embeddings`) and cosine retrieval with mAP / recall@k
(`retrieve`). See docs/features.md."""
from .backbone import FEATURE_KINDS, FeatureModel, checkpoint_fingerprint, dinov2_kwargs_from_shapes, load_feature_model
from .embed import EmbedResult, embed_folder, list_images, load_embeddings, load_patch_tokens, read_meta
from .retrieve import (RetrievalResult, cosine_topk, labels_from_csv, labels_from_folders, retrieval_metrics, retrieve,
                       save_retrieval_grid)

__all__ = ["FeatureModel", "load_feature_model", "dinov2_kwargs_from_shapes", "checkpoint_fingerprint",
           "FEATURE_KINDS", "embed_folder", "load_embeddings", "load_patch_tokens", "list_images", "read_meta",
           "EmbedResult", "cosine_topk", "retrieval_metrics", "retrieve", "labels_from_folders", "labels_from_csv",
           "save_retrieval_grid", "RetrievalResult"]
