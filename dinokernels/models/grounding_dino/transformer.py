"""The Grounding DINO encoder-decoder (SPEC §5.4-5.6): feature enhancer (fusion → text enhancer → deformable
self-attention, per layer), language-guided query selection, cross-modality decoder with iterative box refinement,
and the parameter-free contrastive classifier.

Parameter names follow the official checkpoint (`transformer.*`), so official state dicts load strictly.
Module registration order reproduces the official key order."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...layers import MSDeformAttn
from .fusion import BiAttentionBlock
from .position_encoding import box_position_embedding, text_position_embedding

__all__ = ["MLP", "ContrastiveEmbed", "inverse_sigmoid", "TextEnhancerLayer", "DeformableEncoderLayer",
           "TransformerEncoder", "DecoderLayer", "TransformerDecoder", "Transformer", "TEXT_MASK_LAYOUTS"]

TEXT_MASK_LAYOUTS = ("correct", "official")


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """log(max(x, eps) / max(1 − x, eps)) with x clamped to [0, 1] (official formula; SPEC §1 eps register)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """`num_layers` Linear layers (keys `layers.{i}`), ReLU between them, none after the last.

    forward(x (..., input_dim)) → (..., output_dim)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


class ContrastiveEmbed(nn.Module):
    """Token logits ⟨h_q, text_t⟩, no parameters (SPEC §5.6).

    forward(x (B, Q, C), text (B, T, C), text_token_mask (B, T) bool True = real token) → (B, Q, max_text_len):
    columns of padded tokens and columns T..max_text_len−1 are −inf."""

    def __init__(self, max_text_len: int = 256):
        super().__init__()
        self.max_text_len = max_text_len

    def forward(self, x: Tensor, text: Tensor, text_token_mask: Tensor) -> Tensor:
        t = text.shape[1]
        if t > self.max_text_len:
            raise ValueError(f"ContrastiveEmbed: text has {t} tokens, more than max_text_len={self.max_text_len}")
        logits = (x @ text.transpose(-1, -2)).masked_fill(~text_token_mask[:, None, :], float("-inf"))
        if t == self.max_text_len:
            return logits
        pad = logits.new_full((*logits.shape[:-1], self.max_text_len - t), float("-inf"))
        return torch.cat((logits, pad), -1)

    def extra_repr(self) -> str:
        return f"max_text_len={self.max_text_len}"


def _expand_head_mask(mask: Tensor, num_heads: int, layout: str) -> Tensor:
    """(B, T, T) bool True = blocked → (B·H, T, T) as nn.MultiheadAttention reads it (row b·H + h).

    layout "official" reproduces the official tiling (row h·B + b holds image b's mask), which hands image b's
    mask to another image's heads when B > 1 (SPEC §5.4 item 2); "correct" gives every head its own image's."""
    if layout == "correct":
        return mask.repeat_interleave(num_heads, 0)
    return mask.repeat(num_heads, 1, 1)


class TextEnhancerLayer(nn.Module):
    """Post-norm self-attention over text tokens (official `transformer.encoder.text_layers.{i}`).

    forward(text (B, T, C), self_attention_mask (B, T, T) bool True = may attend, pos (B, T, C) or None)
    → (B, T, C). Queries and keys get `pos`; there is no key-padding mask (the official call is commented out),
    padded tokens are isolated by the sub-sentence mask instead."""

    def __init__(self, d_model: int = 256, nhead: int = 4, dim_feedforward: int = 1024, dropout: float = 0.0,
                 mask_layout: str = "correct"):
        super().__init__()
        if mask_layout not in TEXT_MASK_LAYOUTS:
            raise ValueError(f"text_mask_layout must be one of {TEXT_MASK_LAYOUTS}, got {mask_layout!r}")
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.nhead = nhead
        self.mask_layout = mask_layout

    def forward(self, text: Tensor, self_attention_mask: Tensor, pos: Optional[Tensor] = None) -> Tensor:
        q = k = text if pos is None else text + pos
        blocked = _expand_head_mask(~self_attention_mask, self.nhead, self.mask_layout)
        attn = self.self_attn(q, k, text, attn_mask=blocked, need_weights=False)[0]
        text = self.norm1(text + self.dropout(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(text))))
        return self.norm2(text + self.dropout(ffn))


class DeformableEncoderLayer(nn.Module):
    """MSDA self-attention over the flattened image tokens + FFN, post-norm (`transformer.encoder.layers.{i}`).

    forward(src (B, S, C), pos (B, S, C), reference_points (B, S, L, 2), spatial_shapes (L, 2),
    level_start_index (L,), key_padding_mask (B, S) True = padding) → (B, S, C)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 2048, dropout: float = 0.0, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, key_padding_mask)
        src = self.norm1(src + self.dropout(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


def encoder_reference_points(spatial_shapes: List[Tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Pixel-centre references of every level, normalised by the valid extent, then seen from every level:
    valid_ratios (B, L, 2) (w, h) → (B, S, L, 2) (x, y)."""
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys = (torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5)
        xs = (torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5)
        ref_y = ys[None, :, None] / (valid_ratios[:, lvl, 1][:, None, None] * h)  # (B, h, 1)
        ref_x = xs[None, None, :] / (valid_ratios[:, lvl, 0][:, None, None] * w)  # (B, 1, w)
        ref = torch.stack(torch.broadcast_tensors(ref_x, ref_y), -1)  # (B, h, w, 2)
        refs.append(ref.flatten(1, 2))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


class TransformerEncoder(nn.Module):
    """Feature enhancer: per layer i, fusion_layers[i] → text_layers[i] → layers[i] (SPEC §5.4).

    forward(src (B, S, C), pos (B, S, C), spatial_shapes (L, 2), level_start_index (L,), valid_ratios (B, L, 2),
    key_padding_mask (B, S) True = padding, text (B, T, C), text_token_mask (B, T) True = real,
    text_self_attention_mask (B, T, T) True = may attend, text_position_ids (B, T)) → (memory (B, S, C),
    text (B, T, C))."""

    def __init__(self, num_layers: int = 6, d_model: int = 256, d_ffn: int = 2048, nhead: int = 8,
                 n_levels: int = 4, n_points: int = 4, dropout: float = 0.0, fusion_drop_path: float = 0.1,
                 text_mask_layout: str = "correct"):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(d_model, d_ffn, dropout, n_levels, nhead, n_points)
                                    for _ in range(num_layers))
        self.text_layers = nn.ModuleList(TextEnhancerLayer(d_model, nhead // 2, d_ffn // 2, dropout,
                                                           text_mask_layout) for _ in range(num_layers))
        self.fusion_layers = nn.ModuleList(BiAttentionBlock(d_model, d_model, d_ffn // 2, nhead // 2, dropout,
                                                            fusion_drop_path) for _ in range(num_layers))
        self.d_model = d_model

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                valid_ratios: Tensor, key_padding_mask: Tensor, text: Tensor, text_token_mask: Tensor,
                text_self_attention_mask: Tensor, text_position_ids: Tensor) -> Tuple[Tensor, Tensor]:
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        reference_points = encoder_reference_points(shapes, valid_ratios)
        pos_text = text_position_embedding(text_position_ids, self.d_model).to(text.dtype)
        text_padding_mask = ~text_token_mask
        for fusion, text_layer, layer in zip(self.fusion_layers, self.text_layers, self.layers):
            src, text = fusion(src, text, key_padding_mask, text_padding_mask)
            text = text_layer(text, text_self_attention_mask, pos_text)
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, key_padding_mask)
        return src, text


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention → norm2, text cross-attention → catext_norm, MSDA cross-attention
    on the image memory → norm1, FFN (autocast off) → norm3 (`transformer.decoder.layers.{i}`).

    forward(tgt (B, Q, C), query_pos (B, Q, C), reference_points (B, Q, L, 4), memory (B, S, C),
    memory_padding_mask (B, S) True = padding, spatial_shapes (L, 2), level_start_index (L,), text (B, T, C),
    text_padding_mask (B, T) True = padding) → (B, Q, C)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 2048, dropout: float = 0.0, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.ca_text = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.catext_norm = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                memory_padding_mask: Optional[Tensor], spatial_shapes: Tensor, level_start_index: Tensor,
                text: Tensor, text_padding_mask: Tensor) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attn = self.ca_text(tgt + query_pos, text, text, key_padding_mask=text_padding_mask, need_weights=False)[0]
        tgt = self.catext_norm(tgt + self.dropout(attn))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                               memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout(attn))
        # The official FFN runs with autocast disabled (the norms hand it float32 under autocast).
        with torch.autocast(device_type=tgt.device.type, enabled=False):
            x = tgt.to(self.linear1.weight.dtype)
            ffn = self.linear2(self.dropout(F.relu(self.linear1(x))))
            tgt = self.norm3(x + self.dropout(ffn))
        return tgt


class TransformerDecoder(nn.Module):
    """Decoder with iterative refinement by the shared `bbox_embed` (assigned by the model).

    forward(tgt (B, Q, C), reference_points (B, Q, 4) sigmoid boxes, detached, memory, memory_padding_mask,
    spatial_shapes, level_start_index, valid_ratios (B, L, 2), text, text_padding_mask) →
    (hs: list of num_layers (B, Q, C) outputs after the final LayerNorm, references: list of num_layers + 1
    (B, Q, 4) boxes: the input one, then each layer's refined one, not detached, as the box head of layer l adds
    its delta to references[l] (DINO's look-forward-twice))."""

    def __init__(self, num_layers: int = 6, d_model: int = 256, d_ffn: int = 2048, n_heads: int = 8,
                 n_levels: int = 4, n_points: int = 4, dropout: float = 0.0, inverse_sigmoid_eps: float = 1e-3):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.d_model = d_model
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        # False (official): the query position embedding reads the references scaled to the padded image, so a padded
        # image's queries differ from the same image alone. True: it reads them relative to each image's valid
        # extent, which makes a padded batch give batch-1 results (the predictor sets it; training keeps False).
        self.query_pos_from_valid_extent = False

    def forward(self, tgt: Tensor, reference_points: Tensor, memory: Tensor, memory_padding_mask: Optional[Tensor],
                spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor, text: Tensor,
                text_padding_mask: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
        if self.bbox_embed is None:
            raise RuntimeError("TransformerDecoder.bbox_embed must be set (the model shares its box head)")
        hs, references = [], [reference_points]
        output = tgt
        scale = torch.cat((valid_ratios, valid_ratios), -1)[:, None]  # (B, 1, L, 4)
        for layer, box_head in zip(self.layers, self.bbox_embed):
            refs_input = reference_points[:, :, None] * scale  # (B, Q, L, 4)
            pos_refs = reference_points if self.query_pos_from_valid_extent else refs_input[:, :, 0]
            query_pos = self.ref_point_head(box_position_embedding(pos_refs, self.d_model // 2).to(output.dtype))
            output = layer(output, query_pos, refs_input, memory, memory_padding_mask, spatial_shapes,
                           level_start_index, text, text_padding_mask)
            # Refinement reads the un-normalised output; the reported boxes read norm(output) (model).
            new_ref = (box_head(output) + inverse_sigmoid(reference_points, self.inverse_sigmoid_eps)).sigmoid()
            references.append(new_ref)
            reference_points = new_ref.detach()
            hs.append(self.norm(output))
        return hs, references


def encoder_output_proposals(memory: Tensor, padding_mask: Tensor, spatial_shapes: List[Tuple[int, int]]
                             ) -> Tuple[Tensor, Tensor]:
    """memory (B, S, C), padding_mask (B, S) True = padding → (memory with padded and invalid positions zeroed
    (B, S, C), proposals (B, S, 4) in logit space, +inf where padded or invalid) (SPEC §5.5 item 1)."""
    b = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        pad = padding_mask[:, start:start + h * w].view(b, h, w)
        valid_h = (~pad[:, :, 0]).sum(1).to(memory.dtype)  # (B,)
        valid_w = (~pad[:, 0, :]).sum(1).to(memory.dtype)
        ys = torch.arange(h, dtype=memory.dtype, device=memory.device) + 0.5
        xs = torch.arange(w, dtype=memory.dtype, device=memory.device) + 0.5
        cx = (xs[None, None, :] / valid_w[:, None, None]).expand(b, h, w)
        cy = (ys[None, :, None] / valid_h[:, None, None]).expand(b, h, w)
        wh = torch.full_like(cx, 0.05 * (2.0 ** lvl))
        proposals.append(torch.stack((cx, cy, wh, wh), -1).reshape(b, h * w, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = padding_mask[..., None] | ~valid
    proposals = proposals.masked_fill(invalid, float("inf"))
    memory = memory.masked_fill(invalid, 0.0)
    return memory, proposals


class Transformer(nn.Module):
    """Encoder, query selection and decoder (`transformer.*`).

    forward(srcs: list of L (B, C, H_l, W_l), masks: list of L (B, H_l, W_l) True = padding, pos_embeds: list of
    L (B, C, H_l, W_l), text (B, T, C), text_token_mask (B, T) True = real, text_self_attention_mask (B, T, T)
    True = may attend, text_position_ids (B, T)) → dict with hs (list of (B, Q, C), normalised), references
    (list of num_decoder_layers + 1 (B, Q, 4)), hs_enc (B, Q, C) and ref_enc (B, Q, 4) (the selected encoder
    proposals, undetached), text (B, T, C) (the enhanced text), valid_ratios (B, L, 2)."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_queries: int = 900, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.0,
                 num_feature_levels: int = 4, enc_n_points: int = 4, dec_n_points: int = 4,
                 fusion_drop_path: float = 0.1, max_text_len: int = 256, text_mask_layout: str = "correct",
                 inverse_sigmoid_eps: float = 1e-3):
        super().__init__()
        if d_model % nhead or nhead % 2:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead}), and nhead even (the text "
                             f"enhancer and fusion use nhead // 2 heads)")
        self.d_model = d_model
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.encoder = TransformerEncoder(num_encoder_layers, d_model, dim_feedforward, nhead, num_feature_levels,
                                          enc_n_points, dropout, fusion_drop_path, text_mask_layout)
        self.decoder = TransformerDecoder(num_decoder_layers, d_model, dim_feedforward, nhead, num_feature_levels,
                                          dec_n_points, dropout, inverse_sigmoid_eps)
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.enc_out_bbox_embed: Optional[MLP] = None  # a copy of the model's box head, assigned by the model
        self.enc_out_class_embed = ContrastiveEmbed(max_text_len)
        self._reset_parameters()

    def _reset_parameters(self):
        # Official: xavier on every matrix, then the MSDA modules' own init, level_embed N(0, 1), tgt_embed N(0, 1).
        # The fusion layers keep their γ vectors (1-D, untouched); their projections are matrices.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)
        nn.init.normal_(self.tgt_embed.weight)

    @staticmethod
    def valid_ratios(mask: Tensor) -> Tensor:
        """mask (B, H, W) True = padding → (B, 2) (valid_W / W, valid_H / H)."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).to(torch.float32)
        valid_w = (~mask[:, 0, :]).sum(1).to(torch.float32)
        return torch.stack((valid_w / w, valid_h / h), -1)

    def forward(self, srcs: List[Tensor], masks: List[Tensor], pos_embeds: List[Tensor], text: Tensor,
                text_token_mask: Tensor, text_self_attention_mask: Tensor, text_position_ids: Tensor
                ) -> Dict[str, object]:
        if self.enc_out_bbox_embed is None:
            raise RuntimeError("Transformer.enc_out_bbox_embed must be set (the model assigns a copy of its box head)")
        flat, mask_flat, pos_flat, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append((src.shape[2], src.shape[3]))
            flat.append(src.flatten(2).transpose(1, 2))
            mask_flat.append(mask.flatten(1))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(flat, 1)
        mask_flatten = torch.cat(mask_flat, 1)
        pos_flatten = torch.cat(pos_flat, 1)
        device = src_flatten.device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.valid_ratios(m) for m in masks], 1).to(src_flatten.dtype)

        memory, text = self.encoder(src_flatten, pos_flatten, spatial_shapes, level_start_index, valid_ratios,
                                    mask_flatten, text, text_token_mask, text_self_attention_mask, text_position_ids)

        # Language-guided query selection (SPEC §5.5).
        s = memory.shape[1]
        if s < self.num_queries:
            raise ValueError(f"images too small: the {len(shapes)} feature levels {shapes} hold {s} positions, fewer "
                             f"than num_queries={self.num_queries}; use larger images or fewer queries")
        output_memory, proposals = encoder_output_proposals(memory, mask_flatten, shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        scores = self.enc_out_class_embed(output_memory, text, text_token_mask).max(-1)[0]  # (B, S)
        topk = torch.topk(scores, self.num_queries, dim=1)[1]  # (B, Q)
        hs_enc = torch.gather(output_memory, 1, topk[..., None].expand(-1, -1, self.d_model))
        # The box MLP acts per position: run it on the Q selected rows only, not on all S (S ≈ 17k at 800×1333).
        ref_enc_logits = self.enc_out_bbox_embed(hs_enc) + torch.gather(proposals, 1,
                                                                        topk[..., None].expand(-1, -1, 4))
        b = memory.shape[0]
        tgt = self.tgt_embed.weight[None].expand(b, -1, -1)

        hs, references = self.decoder(tgt, ref_enc_logits.detach().sigmoid(), memory, mask_flatten,
                                      spatial_shapes, level_start_index, valid_ratios, text, ~text_token_mask)
        return {"hs": hs, "references": references, "hs_enc": hs_enc, "ref_enc": ref_enc_logits.sigmoid(),
                "text": text, "valid_ratios": valid_ratios}
