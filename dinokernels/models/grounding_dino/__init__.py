"""Grounding DINO pieces. So far: the training matcher (HungarianMatcher), token-level focal cost."""
from .matcher import HungarianMatcher

__all__ = ["HungarianMatcher"]
