"""GroundingDINO: Swin backbone + BERT + feature enhancer + language-guided query selection + cross-modality
decoder (SPEC §5), with the official parameter names (`state_dict()` has the keys of the released checkpoints, minus
their two known extras), and named builders for the released configurations."""
import copy
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .position_encoding import PositionEmbeddingSineHW
from .transformer import MLP, TEXT_MASK_LAYOUTS, ContrastiveEmbed, Transformer, inverse_sigmoid

__all__ = ["GroundingDINO", "grounding_dino_swint_ogc", "grounding_dino_swinb_cogcoor", "grounding_dino_tiny",
           "DEFAULT_SPECIAL_TOKEN_IDS"]

# [CLS], [SEP], ".", "?" in bert-base-uncased (SPEC §5.3); used when the model has no tokenizer to ask.
DEFAULT_SPECIAL_TOKEN_IDS = (101, 102, 1012, 1029)


def _text():
    # Imported lazily: text.py pulls in transformers' tokenizers.
    from . import text
    return text


def _backbone_channels(backbone: nn.Module) -> List[int]:
    for name in ("out_channels", "num_features"):
        value = getattr(backbone, name, None)
        if isinstance(value, (list, tuple)) and len(value) >= 3:
            return [int(c) for c in value[-3:]]
    embed = getattr(backbone, "embed_dim", None)
    if isinstance(embed, int):
        return [embed * 2, embed * 4, embed * 8]
    raise ValueError("backbone: cannot tell its output channels; give backbone_channels=[C8, C16, C32]")


def _cat_batches(parts: List[object]) -> object:
    """Outputs of consecutive chunks of one batch (tensors with the batch first, in dicts and lists) → one output."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: _cat_batches([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_cat_batches([p[i] for p in parts]) for i in range(len(first)))
    raise TypeError(f"cannot join chunk outputs of type {type(first).__name__}")


def _pad_images(images: Sequence[Tensor]):
    """list of (3, H_i, W_i) → (B, 3, H, W) zero-padded bottom/right, mask (B, H, W) True = padding."""
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3:
            got = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(f"GroundingDINO: images[{i}] must be a (3, H, W) tensor, got {got}")
    h = max(int(img.shape[1]) for img in images)
    w = max(int(img.shape[2]) for img in images)
    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=first.device)
    for i, img in enumerate(images):
        if img.device != first.device or img.dtype != first.dtype or img.shape[0] != first.shape[0]:
            raise ValueError(f"GroundingDINO: images[{i}] is {tuple(img.shape)} {img.dtype} on {img.device}; all "
                             f"images must share channels, dtype and device with images[0] "
                             f"({tuple(first.shape)} {first.dtype} on {first.device})")
        batch[i, :, :img.shape[1], :img.shape[2]] = img
        mask[i, :img.shape[1], :img.shape[2]] = False
    return batch, mask


class GroundingDINO(nn.Module):
    """Grounding DINO (IDEA-Research/GroundingDINO, `groundingdino/models/GroundingDINO/groundingdino.py`).

    Args:
        backbone: image backbone, forward(x (B, 3, H, W)) → 3 maps at strides 8/16/32 (e.g. `swin.swin_t()`).
        text_encoder: a transformers `BertModel` (with its pooler, as in the checkpoints; the pooler is unused).
        tokenizer: BERT tokenizer; needed for `captions=` and to resolve the special ids (else 101/102/1012/1029).
        backbone_channels: channels of the 3 backbone maps (default: read off the backbone).
        num_queries .. dec_n_points: official SwinT-OGC defaults (SPEC §5.1).
        fusion_drop_path: drop path of the image-text fusion (0.1; training only).
        max_text_len: text tokens kept after tokenisation, and logit columns (256).
        text_mask_layout: "correct" (each image's sub-sentence mask reaches its own heads) or "official" (the
            official h·B + b tiling, which mixes masks between images when B > 1; SPEC §5.4).
        inverse_sigmoid_eps: 1e-3 official; transformers uses 1e-5.

    On the CPU, a batch of large images runs through the image path (backbone, encoder, decoder) a few images at a
    time: at 800×1333 one image's activations already exceed the caches, and a whole batch of 4 made every
    memory-bound op (copies, LayerNorm, GELU) about twice as slow per image. `cpu_chunk_positions` (default 8192
    stride-8 feature positions, i.e. 64 × that many pixels: one 800×1333 image, seven 224×224 ones) bounds a chunk;
    None turns chunking off; any other value than None or a positive integer is refused when set. BERT always runs
    on the whole batch; on other devices nothing is chunked. The only numerical difference: the fusion's logit
    maximum (SPEC §5.4) is taken per chunk instead of per batch, which matters only where its ±5e4 clamp is reached.

    forward(images, captions=None, *, masks=None, input_ids=None, attention_mask=None, token_type_ids=None,
    pixel_values=None, pixel_mask=None) → dict:
        images: (B, 3, H, W) normalised images with `masks` (B, H, W) bool True = padding (default: none), or a
            list of (3, H_i, W_i) images, padded here. transformers' names: `pixel_values`, `pixel_mask`
            (1 = valid pixel).
        captions: list of B strings, or their tokenisation `input_ids` (B, T) with `attention_mask` (B, T)
            (1 = real token) and `token_type_ids`.
        Returns pred_logits (B, Q, max_text_len) (−inf past each caption), pred_boxes (B, Q, 4) (cx, cy, w, h)
        normalised to the padded image, aux_outputs (earlier decoder layers, same keys), interm_outputs (the
        selected encoder proposals: pred_logits, pred_boxes), text_mask (B, max_text_len) bool True = real token
        (what the criterion reads), text_token_mask (B, T), input_ids (B, T) (after truncation to max_text_len).
    """

    def __init__(self, backbone: nn.Module, text_encoder: nn.Module, tokenizer=None, *,
                 backbone_channels: Optional[Sequence[int]] = None, num_queries: int = 900, d_model: int = 256,
                 nheads: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.0, num_feature_levels: int = 4,
                 enc_n_points: int = 4, dec_n_points: int = 4, fusion_drop_path: float = 0.1,
                 max_text_len: int = 256, text_mask_layout: str = "correct", inverse_sigmoid_eps: float = 1e-3,
                 special_token_ids: Optional[Sequence[int]] = None):
        super().__init__()
        if text_mask_layout not in TEXT_MASK_LAYOUTS:
            raise ValueError(f"text_mask_layout must be one of {TEXT_MASK_LAYOUTS}, got {text_mask_layout!r}")
        if num_feature_levels < 3:
            raise ValueError(f"num_feature_levels must be >= 3 (the backbone gives 3 maps), got {num_feature_levels}")
        if d_model % 32:
            raise ValueError(f"d_model must be a multiple of 32 (GroupNorm(32) after the input projections), "
                             f"got {d_model}")
        if not (0 < inverse_sigmoid_eps < 0.5):
            raise ValueError(f"inverse_sigmoid_eps must be in (0, 0.5), got {inverse_sigmoid_eps}")
        channels = list(backbone_channels) if backbone_channels is not None else _backbone_channels(backbone)
        if len(channels) != 3:
            raise ValueError(f"backbone_channels must list the 3 backbone maps' channels, got {channels}")
        text_hidden = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
        if text_hidden is None:
            raise ValueError("text_encoder must be a transformers BertModel (it has no config.hidden_size)")

        self.num_queries = num_queries
        self.d_model = d_model
        self.max_text_len = max_text_len
        self.num_feature_levels = num_feature_levels
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        self.cpu_chunk_positions = 8192
        self.tokenizer = tokenizer
        if special_token_ids is None:
            special_token_ids = (_text().special_token_ids(tokenizer) if tokenizer is not None
                                 else DEFAULT_SPECIAL_TOKEN_IDS)
        self.special_token_ids = [int(i) for i in special_token_ids]

        # Registration order reproduces the official key order: transformer, bert, feat_map, input_proj, backbone,
        # bbox_embed.
        self.transformer = Transformer(d_model, nheads, num_queries, num_encoder_layers, num_decoder_layers,
                                       dim_feedforward, dropout, num_feature_levels, enc_n_points, dec_n_points,
                                       fusion_drop_path, max_text_len, text_mask_layout, inverse_sigmoid_eps)
        self.bert = text_encoder
        self.feat_map = nn.Linear(text_hidden, d_model)
        nn.init.xavier_uniform_(self.feat_map.weight)
        nn.init.zeros_(self.feat_map.bias)
        projs = [nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(32, d_model)) for c in channels]
        in_ch = channels[-1]
        for _ in range(num_feature_levels - 3):
            projs.append(nn.Sequential(nn.Conv2d(in_ch, d_model, 3, stride=2, padding=1),
                                       nn.GroupNorm(32, d_model)))
            in_ch = d_model
        self.input_proj = nn.ModuleList(projs)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.backbone = nn.ModuleList([backbone])  # keys backbone.0.* (official Joiner; [1] is parameter-free)
        self.position_embedding = PositionEmbeddingSineHW(d_model // 2, 20.0, 20.0, normalize=True)

        box_head = MLP(d_model, d_model, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        # One box head shared by every decoder layer (it appears under each index); the encoder's is a copy.
        self.bbox_embed = nn.ModuleList([box_head] * num_decoder_layers)
        self.class_embed = ContrastiveEmbed(max_text_len)
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self.transformer.enc_out_bbox_embed = copy.deepcopy(box_head)

    # ----------------------------------------------------------------------------------------------------------
    # Inputs

    def _images(self, images, masks, pixel_values, pixel_mask):
        if pixel_values is not None:
            if images is not None:
                raise ValueError("GroundingDINO: give images or pixel_values, not both")
            if masks is not None:
                raise ValueError("GroundingDINO: give masks (True = padding) with images, pixel_mask (1 = valid) "
                                 "with pixel_values")
            images = pixel_values
            if pixel_mask is not None:
                if not isinstance(pixel_mask, Tensor):
                    raise ValueError(f"GroundingDINO: pixel_mask must be a (B, H, W) tensor, got "
                                     f"{type(pixel_mask).__name__}")
                masks = pixel_mask == 0
        elif pixel_mask is not None:
            raise ValueError("GroundingDINO: pixel_mask needs pixel_values")
        if images is None:
            raise ValueError("GroundingDINO: images (or pixel_values) are required")
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("GroundingDINO: images is an empty list")
            if masks is not None:
                raise ValueError("GroundingDINO: masks cannot be given with a list of images (it is built from "
                                 "their sizes)")
            images, masks = _pad_images(images)
        if not isinstance(images, Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"GroundingDINO: images must be a (B, 3, H, W) tensor or a list of (3, H, W) tensors, "
                             f"got {got}")
        b, c, h, w = images.shape
        if b == 0:
            raise ValueError("GroundingDINO: images is an empty batch (B = 0)")
        if c != 3:
            raise ValueError(f"GroundingDINO: images must have 3 channels, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"GroundingDINO: images must be floating point (normalised), got {images.dtype}")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("GroundingDINO: images contain NaN or inf")
        if masks is None:
            masks = torch.zeros((b, h, w), dtype=torch.bool, device=images.device)
        if not isinstance(masks, Tensor) or tuple(masks.shape) != (b, h, w):
            got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(f"GroundingDINO: masks must be ({b}, {h}, {w}) (True = padding), got {got}")
        if masks.device != images.device:
            raise ValueError(f"GroundingDINO: masks are on {masks.device}, images on {images.device}")
        masks = masks.to(torch.bool)
        if bool(masks[:, 0, 0].any()):
            i = int(masks[:, 0, 0].nonzero()[0, 0])
            raise ValueError(f"GroundingDINO: masks[{i}] pads the top-left pixel; padding must be bottom/right with "
                             f"valid pixels from (0, 0)")
        return images, masks

    def _text_inputs(self, captions, input_ids, attention_mask, token_type_ids, batch: int, device):
        if captions is not None:
            if input_ids is not None:
                raise ValueError("GroundingDINO: give captions or input_ids, not both")
            if isinstance(captions, str):
                captions = [captions]
            if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
                raise ValueError("GroundingDINO: captions must be a list of strings")
            if self.tokenizer is None:
                raise ValueError("GroundingDINO: captions need a tokenizer (build the model with tokenizer=...), or "
                                 "pass input_ids")
            if len(captions) != batch:
                raise ValueError(f"GroundingDINO: {len(captions)} captions for {batch} images")
            text = _text()
            # Tokenised whole: the sub-sentence mask is built before truncation to max_text_len, as officially.
            tok = text.tokenize_captions(self.tokenizer, [text.preprocess_caption(c) for c in captions],
                                         max_text_len=None)
            input_ids = tok["input_ids"]
            attention_mask = tok.get("attention_mask")
            token_type_ids = tok.get("token_type_ids")
        if input_ids is None:
            raise ValueError("GroundingDINO: captions or input_ids are required")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64,
                                                                                               torch.int32):
            got = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, Tensor) else \
                type(input_ids).__name__
            raise ValueError(f"GroundingDINO: input_ids must be a (B, T) integer tensor, got {got}")
        if input_ids.shape[0] != batch or input_ids.shape[1] == 0:
            raise ValueError(f"GroundingDINO: input_ids must be ({batch}, T >= 1), got {tuple(input_ids.shape)}")
        input_ids = input_ids.to(device=device, dtype=torch.long)
        vocab = getattr(self.bert.config, "vocab_size", None)
        if vocab is not None and (bool((input_ids < 0).any()) or bool((input_ids >= vocab).any())):
            raise ValueError(f"GroundingDINO: input_ids must be in [0, {vocab}) (the text encoder's vocabulary)")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != tuple(input_ids.shape)):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"GroundingDINO: {name} must have input_ids' shape {tuple(input_ids.shape)}, got "
                                 f"{got}")
        attention_mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                          else attention_mask.to(device) != 0)
        token_type_ids = (torch.zeros_like(input_ids) if token_type_ids is None
                          else token_type_ids.to(device=device, dtype=torch.long))
        return input_ids, attention_mask, token_type_ids

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Dict[str, Tensor]:
        """input_ids, attention_mask (bool True = real), token_type_ids (B, T) → dict of the projected BERT features
        `text` (B, T', C), `text_token_mask` (B, T') bool, `text_self_attention_mask` (B, T', T') bool True = may
        attend, `position_ids` (B, T'), `input_ids` (B, T'); T' = min(T, max_text_len)."""
        special = torch.as_tensor(self.special_token_ids, dtype=torch.long, device=input_ids.device)
        sub_mask, position_ids = _text().sub_sentence_masks_and_position_ids(input_ids, special)
        n = self.max_text_len
        if input_ids.shape[1] > n:  # truncation after the masks are built (SPEC §5.3)
            sub_mask, position_ids = sub_mask[:, :n, :n], position_ids[:, :n]
            input_ids, attention_mask, token_type_ids = input_ids[:, :n], attention_mask[:, :n], token_type_ids[:, :n]
        max_pos = getattr(self.bert.config, "max_position_embeddings", None)
        if max_pos is not None and int(position_ids.max()) >= max_pos:
            raise ValueError(f"GroundingDINO: a phrase is {int(position_ids.max()) + 1} tokens long, more than the "
                             f"text encoder's max_position_embeddings={max_pos}")
        # BERT reads a 4-D boolean mask (B, 1, T, T), True = may attend: the sub-sentence mask, not the padding mask.
        hidden = self.bert(input_ids=input_ids, attention_mask=sub_mask[:, None], token_type_ids=token_type_ids,
                           position_ids=position_ids).last_hidden_state
        return {"text": self.feat_map(hidden), "text_token_mask": attention_mask,
                "text_self_attention_mask": sub_mask, "position_ids": position_ids, "input_ids": input_ids}

    @property
    def cpu_chunk_positions(self) -> Optional[int]:
        return self._cpu_chunk_positions

    @cpu_chunk_positions.setter
    def cpu_chunk_positions(self, value: Optional[int]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"GroundingDINO.cpu_chunk_positions must be a positive integer or None (no chunking), "
                             f"got {value!r}")
        self._cpu_chunk_positions = value

    def _chunk_size(self, batch: int, positions: int, device: torch.device) -> int:
        """Images per chunk of the image path for `positions` stride-8 feature positions per image (see the class
        docstring): the whole batch off the CPU or with chunking off."""
        limit = self.cpu_chunk_positions
        if device.type != "cpu" or limit is None or batch <= 1:
            return max(batch, 1)
        return max(1, min(batch, limit // max(int(positions), 1)))

    def image_features(self, images: Tensor, masks: Tensor):
        """images (B, 3, H, W), masks (B, H, W) True = padding → (srcs, masks, pos): lists of num_feature_levels
        (B, C, H_l, W_l), (B, H_l, W_l), (B, C, H_l, W_l)."""
        b = images.shape[0]
        step = self._chunk_size(b, images.shape[-2] * images.shape[-1] // 64, images.device)
        if step < b:
            return _cat_batches([self._image_features(images[i:i + step], masks[i:i + step])
                                 for i in range(0, b, step)])
        return self._image_features(images, masks)

    def _image_features(self, images: Tensor, masks: Tensor):
        feats = self.backbone[0](images)
        if not isinstance(feats, (list, tuple)) or len(feats) != 3:
            raise RuntimeError(f"backbone must return a list of 3 feature maps, got {type(feats).__name__}"
                               + (f" of {len(feats)}" if isinstance(feats, (list, tuple)) else ""))

        def level_mask(x: Tensor) -> Tensor:
            return F.interpolate(masks[None].float(), size=x.shape[-2:]).to(torch.bool)[0]  # nearest

        srcs, lvl_masks, pos = [], [], []
        for lvl, feat in enumerate(feats):
            m = level_mask(feat)
            srcs.append(self.input_proj[lvl](feat))
            lvl_masks.append(m)
            pos.append(self.position_embedding(m).to(feat.dtype))
        for lvl in range(3, self.num_feature_levels):
            src = self.input_proj[lvl](feats[-1] if lvl == 3 else srcs[-1])
            m = level_mask(src)
            srcs.append(src)
            lvl_masks.append(m)
            pos.append(self.position_embedding(m).to(src.dtype))
        return srcs, lvl_masks, pos

    # ----------------------------------------------------------------------------------------------------------

    def forward(self, images=None, captions: Optional[Sequence[str]] = None, *, masks: Optional[Tensor] = None,
                input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, pixel_values: Optional[Tensor] = None,
                pixel_mask: Optional[Tensor] = None) -> Dict[str, object]:
        images, masks = self._images(images, masks, pixel_values, pixel_mask)
        input_ids, attention_mask, token_type_ids = self._text_inputs(
            captions, input_ids, attention_mask, token_type_ids, images.shape[0], images.device)
        text = self.encode_text(input_ids, attention_mask, token_type_ids)
        srcs, lvl_masks, pos = self.image_features(images, masks)
        return self.forward_features(srcs, lvl_masks, pos, text)

    # ----------------------------------------------------------------------------------------------------------
    # Hook for the predictor (predictor.py): the part of forward after the image and text features, so that cached
    # text features and per-image backbone features can be fed to one batched encoder/decoder pass.

    def forward_features(self, srcs: List[Tensor], masks: List[Tensor], pos: List[Tensor],
                         text: Dict[str, Tensor]) -> Dict[str, object]:
        """srcs, masks, pos: `image_features`' lists; text: `encode_text`'s dict (text (B, T, C), text_token_mask,
        text_self_attention_mask, position_ids, input_ids) → forward's output dict."""
        b = srcs[0].shape[0]
        step = self._chunk_size(b, srcs[0].shape[-2] * srcs[0].shape[-1], srcs[0].device)
        if step < b:
            parts = [self._forward_features([x[i:i + step] for x in srcs], [x[i:i + step] for x in masks],
                                            [x[i:i + step] for x in pos], {k: v[i:i + step] for k, v in text.items()})
                     for i in range(0, b, step)]
            return _cat_batches(parts)
        return self._forward_features(srcs, masks, pos, text)

    def _forward_features(self, srcs: List[Tensor], masks: List[Tensor], pos: List[Tensor],
                          text: Dict[str, Tensor]) -> Dict[str, object]:
        out = self.transformer(srcs, masks, pos, text["text"], text["text_token_mask"],
                               text["text_self_attention_mask"], text["position_ids"])
        enhanced, token_mask = out["text"], text["text_token_mask"]
        logits, boxes = [], []
        for hs, ref, box_head in zip(out["hs"], out["references"][:-1], self.bbox_embed):
            boxes.append((box_head(hs) + inverse_sigmoid(ref, self.inverse_sigmoid_eps)).sigmoid())
            logits.append(self.class_embed(hs, enhanced, token_mask))
        text_mask = torch.zeros((token_mask.shape[0], self.max_text_len), dtype=torch.bool, device=token_mask.device)
        text_mask[:, :token_mask.shape[1]] = token_mask
        return {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])],
            "interm_outputs": {"pred_logits": self.transformer.enc_out_class_embed(out["hs_enc"], enhanced,
                                                                                   token_mask),
                               "pred_boxes": out["ref_enc"]},
            "text_mask": text_mask,
            "text_token_mask": token_mask,
            "input_ids": text["input_ids"],
        }


# --------------------------------------------------------------------------------------------------------------
# Builders


def _text_parts(text_encoder, tokenizer):
    """(BertModel, tokenizer) from a local BERT directory, a BertConfig or a BertModel; nothing is downloaded."""
    if text_encoder is None:
        raise ValueError("text_encoder is required: a local bert-base-uncased directory, a transformers BertConfig "
                         "(random weights) or a BertModel")
    text = _text()
    bert = text_encoder if isinstance(text_encoder, nn.Module) else text.build_text_encoder(text_encoder)
    if tokenizer is None and isinstance(text_encoder, (str, os.PathLike)):
        tokenizer = text.build_tokenizer(text_encoder)
    return bert, tokenizer


def grounding_dino_swint_ogc(text_encoder=None, tokenizer=None, **kwargs) -> GroundingDINO:
    """GroundingDINO-T (`groundingdino_swint_ogc.pth`): Swin-T backbone, bert-base text encoder, SPEC §5.1.

    text_encoder: a local bert-base-uncased directory, a transformers BertConfig (random weights) or a BertModel;
    tokenizer: a BERT tokenizer (default: built from the directory, if one was given). kwargs override the
    GroundingDINO defaults (e.g. text_mask_layout, inverse_sigmoid_eps)."""
    from .swin import swin_t
    bert, tokenizer = _text_parts(text_encoder, tokenizer)
    return GroundingDINO(swin_t(), bert, tokenizer, **kwargs)


def grounding_dino_swinb_cogcoor(text_encoder=None, tokenizer=None, **kwargs) -> GroundingDINO:
    """GroundingDINO-B (`groundingdino_swinb_cogcoor.pth`): Swin-B (window 12) backbone, otherwise as
    grounding_dino_swint_ogc."""
    from .swin import swin_b
    bert, tokenizer = _text_parts(text_encoder, tokenizer)
    return GroundingDINO(swin_b(), bert, tokenizer, **kwargs)


def grounding_dino_tiny(tokenizer=None, *, vocab_size: int = 30522, **kwargs) -> GroundingDINO:
    """A small random model for tests and examples (transformers' test sizes, SPEC §5.10 item 6): Swin embed 8,
    one block per stage, window 7; BERT hidden 8, 2 layers; d_model 32, 2 + 2 layers, FFN 32, 4 heads (2 in the text
    enhancer and fusion, so the per-head mask layout matters), 2 points,
    4 queries, max_text_len 32. kwargs override the GroundingDINO arguments."""
    from transformers import BertConfig
    from .swin import SwinTransformer
    backbone = SwinTransformer(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=7)
    bert_config = BertConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=16, max_position_embeddings=64)
    bert = _text().build_text_encoder(bert_config)
    options = dict(backbone_channels=[16, 32, 64], num_queries=4, d_model=32, nheads=4, num_encoder_layers=2,
                   num_decoder_layers=2, dim_feedforward=32, enc_n_points=2, dec_n_points=2, max_text_len=32)
    options.update(kwargs)
    return GroundingDINO(backbone, bert, tokenizer, **options)
