"""Benchmark shapes taken from the models (SPEC §1-§3)."""

# KoLeo runs on the student backbone CLS tokens of one global crop on one rank (SPEC §3.5): B is the per-rank
# batch, D the embedding width of ViT-S/B/L (384/768/1024).
KOLEO = [{"B": b, "D": d} for b in (256, 1024, 4096) for d in (384, 768, 1024)]
KOLEO_QUICK = [{"B": 1024, "D": 384}]

# DINO loss (SPEC §2.1): S crops per image (2 global + locals), T = 2 global crops, B images per rank, K
# prototypes. The CPU target of the SSL-loss issue is S=10, T=2, B=32, K=65536; the GPU bandwidth shape is B=64.
DINO_LOSS = [{"S": 10, "T": 2, "B": 32, "K": 65536}, {"S": 4, "T": 2, "B": 64, "K": 65536},
             {"S": 10, "T": 2, "B": 32, "K": 4096}]
DINO_LOSS_QUICK = [{"S": 10, "T": 2, "B": 32, "K": 65536}]
DINO_LOSS_CUDA = [{"S": 10, "T": 2, "B": 64, "K": 65536}, {"S": 10, "T": 2, "B": 256, "K": 65536},
                  {"S": 10, "T": 2, "B": 64, "K": 131072}]

# iBOT masked tokens: about 2B images × (0.1–0.5 of 196 patches) per rank.
IBOT = [{"n": 1024, "K": 65536}, {"n": 4096, "K": 8192}]
IBOT_QUICK = [{"n": 1024, "K": 65536}]

# Teacher targets: N = 2B global-crop rows (softmax_center), N = 1024 for the Sinkhorn-Knopp target shape.
SOFTMAX_CENTER = [{"N": 64, "K": 65536}, {"N": 512, "K": 65536}]
SOFTMAX_CENTER_QUICK = [{"N": 64, "K": 65536}]
SINKHORN = [{"N": 1024, "K": 65536}, {"N": 256, "K": 65536}, {"N": 256, "K": 131072}]
SINKHORN_QUICK = [{"N": 1024, "K": 65536}, {"N": 256, "K": 65536}]  # the issues' CPU targets

# Grounding DINO matching: B images, Q = 900 queries, G targets per image, T = 256 text tokens; L = 1 (one layer)
# or 7 (6 decoder layers + encoder: all the matchings of one training step).
MATCHER = [{"L": 1, "B": 4, "Q": 900, "G": 20, "T": 256}, {"L": 7, "B": 4, "Q": 900, "G": 20, "T": 256},
           {"L": 1, "B": 4, "Q": 900, "G": 100, "T": 256}]
MATCHER_QUICK = [{"L": 1, "B": 4, "Q": 900, "G": 20, "T": 256}]

# Multi-scale deformable attention (SPEC §4, §5.2, §7.2): the Grounding DINO Swin-T encoder on an 800×1333 image,
# 4 levels at strides 8/16/32/64 (ceil: 100×167, 50×84, 25×42, 13×21 → S = 22,223), M = 8 heads, D = 32, P = 4,
# one query per pixel (Lq = S); and its decoder cross-attention (900 queries, 4-d box references).
GDINO_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
MSDA = [{"case": "gdino_encoder", "locations": "realistic", "N": 1, "Lq": 22223},
        {"case": "gdino_encoder", "locations": "random", "N": 1, "Lq": 22223},
        {"case": "gdino_decoder", "locations": "realistic", "N": 2, "Lq": 900}]
MSDA_QUICK = MSDA[:1]
