"""Benchmark shapes taken from the models (SPEC §1-§3)."""

# KoLeo runs on the student backbone CLS tokens of one global crop on one rank (SPEC §3.5): B is the per-rank
# batch, D the embedding width of ViT-S/B/L (384/768/1024).
KOLEO = [{"B": b, "D": d} for b in (256, 1024, 4096) for d in (384, 768, 1024)]
KOLEO_QUICK = [{"B": 1024, "D": 384}]
