"""Data curation as in DINOv2's LVD-142M pipeline (SPEC §3.12): copy deduplication of an uncurated pool,
removal of copies of evaluation images, and retrieval of pool images close to a curated set, on embeddings.

search: k-NN search and k-means (faiss, or an exact torch fallback). dedup: k-NN graph above a cosine threshold,
connected components, threshold calibration. select: retrieval by nearest neighbours or by clusters.
pipeline: the whole run on folders of images (`dinokernels curate`).
"""
from .search import (BACKEND_ENV, SearchResult, assign_clusters, available_backend, exact_knn, kmeans, knn_search,
                     measure_recall, normalize_rows)

__all__ = ["BACKEND_ENV", "SearchResult", "assign_clusters", "available_backend", "exact_knn", "kmeans",
           "knn_search", "measure_recall", "normalize_rows"]
