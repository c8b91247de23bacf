"""Frozen features at work (issue 14): one loader for every backbone checkpoint (`load_feature_model`), resumable
sharded embedding of image folders (`embed_folder`, `load_embeddings`) and cosine retrieval with mAP / recall@k
(`retrieve`). See docs/features.md."""
from .backbone import FEATURE_KINDS, FeatureModel, checkpoint_fingerprint, dinov2_kwargs_from_shapes, load_feature_model

__all__ = ["FeatureModel", "load_feature_model", "dinov2_kwargs_from_shapes", "checkpoint_fingerprint",
           "FEATURE_KINDS"]
