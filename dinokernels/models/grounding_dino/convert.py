"""Grounding DINO weights (SPEC §5.9, §5.10): loading the released `.pth` files, and converting state dicts between
the official parameter names (which this package's model uses) and transformers' `GroundingDinoForObjectDetection`
(transformers 5.x names).

The mapping was derived by listing the keys of both models built with the Swin-T and Swin-B settings and pairing
them one to one. The Swin backbone (`backbone.0.*` ↔ `model.backbone.conv_encoder.model.*`) is converted by
`swin.swin_state_dict_{to,from}_transformers`: fused `attn.qkv` ↔ `attention.{q,k,v}_proj`, the persistent official
`relative_position_index` checked going there and rebuilt coming back (transformers recomputes it), `norm{i}` ↔
`hidden_states_norms.stage{i+1}`. Differences elsewhere that are not plain renames:

* the official `nn.MultiheadAttention` layers (text enhancer, decoder self- and text cross-attention) hold fused
  `in_proj_weight` / `in_proj_bias`, transformers separate `{query,key,value}.{weight,bias}`: the fused tensor is
  the three stacked along dim 0 in that order.
* official `bert.pooler.*` is not in transformers' text backbone (built without a pooler). Neither model uses it:
  going to transformers it is dropped; coming back it is filled with zeros.
* transformers' `swin.layernorm.*` (the final norm of a plain SwinModel) is not used by its Swin backbone and has no
  official counterpart: it is dropped coming back and written as the identity (weight 1, bias 0), its initial value
  in transformers, going there.
* the shared decoder box head appears under 12 names in both (`bbox_embed.{0..5}`, decoder `bbox_embed.{0..5}`);
  each name maps to its counterpart.

Every other tensor is renamed one to one; a key that no rule covers is an error naming it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..dino.checkpoint import WeightsMismatchError
from .swin import swin_state_dict_from_transformers, swin_state_dict_to_transformers

__all__ = [
    "KNOWN_EXTRA_CHECKPOINT_KEYS",
    "LoadReport",
    "WeightsMismatchError",
    "from_transformers",
    "load_official_weights",
    "state_dict_from_transformers",
    "state_dict_to_transformers",
    "to_transformers",
]

# Keys the released files hold although the inference model does not create them (manifest
# `known_extra_checkpoint_keys`): the training code's denoising label embedding, and BERT's position-id buffer,
# persistent in transformers before 4.31.
KNOWN_EXTRA_CHECKPOINT_KEYS = ("label_enc.weight", "bert.embeddings.position_ids")

_HF_SWIN = "model.backbone.conv_encoder.model."  # transformers' SwinBackbone inside GroundingDinoForObjectDetection

# (official prefix, transformers prefix): a rule matches a key equal to the prefix or starting with prefix + ".";
# the remainder is kept. {i} stands for a layer index. Fused attention is handled separately.
_RULES: list[tuple[str, str]] = [
    # image and text inputs
    ("input_proj", "model.input_proj_vision"),
    ("bert", "model.text_backbone"),
    ("feat_map", "model.text_projection"),
    # encoder: one transformers layer holds the official deformable, text and fusion layers of the same index
    ("transformer.encoder.layers.{i}.self_attn", "model.encoder.layers.{i}.deformable_layer.self_attn"),
    ("transformer.encoder.layers.{i}.norm1", "model.encoder.layers.{i}.deformable_layer.self_attn_layer_norm"),
    ("transformer.encoder.layers.{i}.linear1", "model.encoder.layers.{i}.deformable_layer.fc1"),
    ("transformer.encoder.layers.{i}.linear2", "model.encoder.layers.{i}.deformable_layer.fc2"),
    ("transformer.encoder.layers.{i}.norm2", "model.encoder.layers.{i}.deformable_layer.final_layer_norm"),
    ("transformer.encoder.text_layers.{i}.self_attn", "model.encoder.layers.{i}.text_enhancer_layer.self_attn"),
    ("transformer.encoder.text_layers.{i}.linear1", "model.encoder.layers.{i}.text_enhancer_layer.fc1"),
    ("transformer.encoder.text_layers.{i}.linear2", "model.encoder.layers.{i}.text_enhancer_layer.fc2"),
    ("transformer.encoder.text_layers.{i}.norm1", "model.encoder.layers.{i}.text_enhancer_layer.layer_norm_before"),
    ("transformer.encoder.text_layers.{i}.norm2", "model.encoder.layers.{i}.text_enhancer_layer.layer_norm_after"),
    ("transformer.encoder.fusion_layers.{i}.gamma_v", "model.encoder.layers.{i}.fusion_layer.vision_param"),
    ("transformer.encoder.fusion_layers.{i}.gamma_l", "model.encoder.layers.{i}.fusion_layer.text_param"),
    ("transformer.encoder.fusion_layers.{i}.layer_norm_v", "model.encoder.layers.{i}.fusion_layer.layer_norm_vision"),
    ("transformer.encoder.fusion_layers.{i}.layer_norm_l", "model.encoder.layers.{i}.fusion_layer.layer_norm_text"),
    ("transformer.encoder.fusion_layers.{i}.attn.v_proj", "model.encoder.layers.{i}.fusion_layer.attn.vision_proj"),
    ("transformer.encoder.fusion_layers.{i}.attn.l_proj", "model.encoder.layers.{i}.fusion_layer.attn.text_proj"),
    ("transformer.encoder.fusion_layers.{i}.attn.values_v_proj",
     "model.encoder.layers.{i}.fusion_layer.attn.values_vision_proj"),
    ("transformer.encoder.fusion_layers.{i}.attn.values_l_proj",
     "model.encoder.layers.{i}.fusion_layer.attn.values_text_proj"),
    ("transformer.encoder.fusion_layers.{i}.attn.out_v_proj",
     "model.encoder.layers.{i}.fusion_layer.attn.out_vision_proj"),
    ("transformer.encoder.fusion_layers.{i}.attn.out_l_proj",
     "model.encoder.layers.{i}.fusion_layer.attn.out_text_proj"),
    # decoder
    ("transformer.decoder.layers.{i}.self_attn", "model.decoder.layers.{i}.self_attn"),
    ("transformer.decoder.layers.{i}.norm2", "model.decoder.layers.{i}.self_attn_layer_norm"),
    ("transformer.decoder.layers.{i}.ca_text", "model.decoder.layers.{i}.encoder_attn_text"),
    ("transformer.decoder.layers.{i}.catext_norm", "model.decoder.layers.{i}.encoder_attn_text_layer_norm"),
    ("transformer.decoder.layers.{i}.cross_attn", "model.decoder.layers.{i}.encoder_attn"),
    ("transformer.decoder.layers.{i}.norm1", "model.decoder.layers.{i}.encoder_attn_layer_norm"),
    ("transformer.decoder.layers.{i}.linear1", "model.decoder.layers.{i}.fc1"),
    ("transformer.decoder.layers.{i}.linear2", "model.decoder.layers.{i}.fc2"),
    ("transformer.decoder.layers.{i}.norm3", "model.decoder.layers.{i}.final_layer_norm"),
    ("transformer.decoder.norm", "model.decoder.layer_norm"),
    ("transformer.decoder.ref_point_head", "model.decoder.reference_points_head"),
    ("transformer.decoder.bbox_embed", "model.decoder.bbox_embed"),
    # two-stage query selection and the rest
    ("transformer.level_embed", "model.level_embed"),
    ("transformer.tgt_embed", "model.query_position_embeddings"),
    ("transformer.enc_output", "model.enc_output"),
    ("transformer.enc_output_norm", "model.enc_output_norm"),
    ("transformer.enc_out_bbox_embed", "model.encoder_output_bbox_embed"),
    ("bbox_embed", "bbox_embed"),
]

_BACKBONE = "backbone.0."  # the official Swin; its keys are converted by swin.py
_BLOCK_NORM1 = re.compile(r"^backbone\.0\.layers\.\d+\.blocks\.\d+\.norm1\.weight$")
_BIAS_TABLE = re.compile(r"^backbone\.0\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table$")
_MHA_IN_PROJ = re.compile(r"^(.*)\.in_proj_(weight|bias)$")
# transformers' split MultiheadAttention projections (BERT's attention.self.{query,key,value} are separate there
# too and stay separate, so the text backbone is excluded).
_HF_MHA_SPLIT = re.compile(r"^(model\.(?:encoder|decoder)\..*)\.(query|key|value)\.(weight|bias)$")
_POOLER = re.compile(r"^bert\.pooler\.dense\.(weight|bias)$")


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile("^" + pattern + r"(?P<rest>\..*)?$")


_TO_HF = [(_compile(src), dst) for src, dst in _RULES]
_FROM_HF = [(_compile(dst), src) for src, dst in _RULES]


def _rename(key: str, rules) -> str | None:
    """The key renamed by the first rule that matches it, or None."""
    for pattern, template in rules:
        m = pattern.match(key)
        if m is not None:
            groups = m.groupdict()
            out = template.replace("{i}", groups.get("i") or "")
            return out + (groups["rest"] or "")
    return None


def _window_from_table(key: str, table: Tensor) -> int:
    rows = table.shape[0] if table.dim() == 2 else 0
    side = round(rows ** 0.5)
    if rows == 0 or side * side != rows or side % 2 == 0:
        raise ValueError(f"{key}: expected a ((2w-1)^2, heads) relative position bias table, got shape "
                         f"{tuple(table.shape)}")
    return (side + 1) // 2


def _check_state_dict(sd, name: str) -> None:
    if not isinstance(sd, Mapping):
        raise TypeError(f"{name} must be a mapping from parameter names to tensors, got {type(sd).__name__}")
    bad = [str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"{name}: these entries are not (str, Tensor) pairs: {', '.join(bad)}")


def _split3(key: str, tensor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if tensor.dim() == 0 or tensor.shape[0] % 3 != 0:
        raise ValueError(f"{key}: a fused q/k/v tensor needs a first dimension divisible by 3, got shape "
                         f"{tuple(tensor.shape)}")
    return tuple(t.clone() for t in tensor.chunk(3, dim=0))


def _swin_error(exc: Exception) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def state_dict_to_transformers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official-named Grounding DINO state dict → transformers `GroundingDinoForObjectDetection` state dict.

    `state_dict` is what this package's `GroundingDINO.state_dict()` returns (the official names, without a
    `module.` prefix or the released files' extra keys). The Swin backbone goes through
    `swin.swin_state_dict_to_transformers` (q/k/v split, relative position indices checked and dropped);
    `nn.MultiheadAttention` in_proj tensors are split into query/key/value; `bert.pooler.*` is dropped;
    transformers' unused `swin.layernorm` is added as the identity. Raises ValueError naming the keys it cannot
    place.
    """
    _check_state_dict(state_dict, "state_dict")
    out: dict[str, Tensor] = {}
    problems: list[str] = []
    backbone = {k: v for k, v in state_dict.items() if k.startswith(_BACKBONE)}
    if backbone:
        try:
            out.update(swin_state_dict_to_transformers(backbone, _BACKBONE, _HF_SWIN))
        except (KeyError, ValueError) as exc:
            problems.append(_swin_error(exc))
        norms = [v for k, v in backbone.items() if _BLOCK_NORM1.match(k)]
        if norms:
            # transformers builds a plain SwinModel's final LayerNorm (last-stage width: the widest block norm)
            # inside its Swin backbone but never calls it.
            widest = max(norms, key=lambda t: t.shape[0])
            out[_HF_SWIN + "swin.layernorm.weight"] = torch.ones_like(widest)
            out[_HF_SWIN + "swin.layernorm.bias"] = torch.zeros_like(widest)
    unmapped: list[str] = []
    for key, value in state_dict.items():
        if key in backbone or _POOLER.match(key):
            continue
        m = _MHA_IN_PROJ.match(key)
        if m is not None:
            module = _rename(m.group(1), _TO_HF)
            if module is None:
                unmapped.append(key)
                continue
            for name, part in zip(("query", "key", "value"), _split3(key, value)):
                out[f"{module}.{name}.{m.group(2)}"] = part
            continue
        new = _rename(key, _TO_HF)
        if new is None:
            unmapped.append(key)
            continue
        out[new] = value
    if unmapped:
        problems.append("no transformers name for these keys: " + ", ".join(unmapped))
    if problems:
        raise ValueError("state_dict_to_transformers: " + "; ".join(problems))
    return out


def state_dict_from_transformers(hf_state_dict: Mapping[str, Tensor], config=None) -> dict[str, Tensor]:
    """transformers `GroundingDinoForObjectDetection` state dict (5.x names) → official-named state dict, loadable
    into this package's `GroundingDINO` strictly.

    The Swin backbone goes through `swin.swin_state_dict_from_transformers` (q/k/v fused, relative position indices
    rebuilt from each bias table, the unused `swin.layernorm` dropped); query/key/value of the attention layers are
    fused into `in_proj_weight`/`in_proj_bias` (stacked in that order along dim 0); `bert.pooler.*` (absent in
    transformers, unused) is filled with zeros. `config` (a `GroundingDinoConfig`, optional) is only checked against
    the weights (Swin window size, text hidden size). Raises ValueError naming the keys it cannot place.
    """
    _check_state_dict(hf_state_dict, "hf_state_dict")
    out: dict[str, Tensor] = {}
    problems: list[str] = []
    backbone = {k: v for k, v in hf_state_dict.items() if k.startswith(_HF_SWIN)}
    if backbone:
        try:
            out.update(swin_state_dict_from_transformers(backbone, _HF_SWIN, _BACKBONE))
        except (KeyError, ValueError) as exc:
            problems.append(_swin_error(exc))
    unmapped: list[str] = []
    split: dict[str, dict[str, Tensor]] = {}  # official in_proj key → {query/key/value: tensor}
    for key, value in hf_state_dict.items():
        if key in backbone:
            continue
        m = _HF_MHA_SPLIT.match(key)
        if m is not None:
            module = _rename(m.group(1), _FROM_HF)
            if module is None:
                unmapped.append(key)
                continue
            split.setdefault(f"{module}.in_proj_{m.group(3)}", {})[m.group(2)] = value
            continue
        new = _rename(key, _FROM_HF)
        if new is None:
            unmapped.append(key)
            continue
        out[new] = value
    if unmapped:
        problems.append("no official name for these keys: " + ", ".join(unmapped))
    incomplete = []
    for target, parts in split.items():
        names = ("query", "key", "value")
        if set(parts) != set(names):
            incomplete.append(f"{target} (has {sorted(parts)})")
        elif len({tuple(parts[n].shape) for n in names}) != 1:
            incomplete.append(f"{target} (query/key/value shapes differ)")
        else:
            out[target] = torch.cat([parts[n] for n in names], dim=0)
    if incomplete:
        problems.append("incomplete or inconsistent query/key/value groups: " + ", ".join(incomplete))
    if problems:
        raise ValueError("state_dict_from_transformers: " + "; ".join(problems))

    if config is not None:
        for key, table in out.items():
            if _BIAS_TABLE.match(key) and _window_from_table(key, table) != config.backbone_config.window_size:
                raise ValueError(f"state_dict_from_transformers: {key} implies window size "
                                 f"{_window_from_table(key, table)}, config says {config.backbone_config.window_size}")
    words = out.get("bert.embeddings.word_embeddings.weight")
    if words is not None:
        hidden = words.shape[1]
        if config is not None and hidden != config.text_config.hidden_size:
            raise ValueError(f"state_dict_from_transformers: text embeddings are {hidden} wide, config.text_config."
                             f"hidden_size is {config.text_config.hidden_size}")
        out["bert.pooler.dense.weight"] = torch.zeros(hidden, hidden, dtype=words.dtype, device=words.device)
        out["bert.pooler.dense.bias"] = torch.zeros(hidden, dtype=words.dtype, device=words.device)
    return out


# --------------------------------------------------------------------------------------------------------------
# Released checkpoints


@dataclass
class LoadReport:
    """What `load_official_weights` did: keys loaded into the model, known extra keys ignored, model keys the
    checkpoint lacked, and checkpoint keys the model lacks (the last two are non-empty only with strict=False)."""
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _read_checkpoint(path) -> object:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_official_weights: no such file: {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"load_official_weights: {path!r} is a directory, expected a .pth file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"load_official_weights: {path!r} is empty (0 bytes); an interrupted download?")
    # Training checkpoints (Open-GroundingDino) keep their argparse.Namespace under "args": allow that one class.
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    # mmap keeps the tensors in the page cache instead of a second in-memory copy of the model; only files in the
    # zip format (torch >= 1.6) can be memory-mapped.
    mmap = zipfile.is_zipfile(path)
    try:
        with safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # pickle, zip and torch errors all mean the same thing to the caller
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"load_official_weights: {path!r} is not a readable PyTorch checkpoint (truncated, "
                         f"corrupt, or not saved by torch.save): {type(exc).__name__}: {reason[:300]}") from None


def _extract(checkpoint, where: str) -> dict[str, Tensor]:
    """The weights: checkpoint["model"] if present, else the checkpoint itself if it is a flat state dict."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"load_official_weights: {where} holds a {type(checkpoint).__name__}, not a checkpoint "
                         f"dict (expected {{'model': state_dict}} or a state dict)")
    sd = checkpoint.get("model", checkpoint)
    if not isinstance(sd, Mapping) or len(sd) == 0:
        raise ValueError(f"load_official_weights: {where} has no weights: expected a non-empty state dict under "
                         f"'model' or a flat state dict; its entries are {sorted(map(str, checkpoint))[:20]}")
    not_tensors = [str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(f"load_official_weights: {where}: these entries are not tensors, so this is not a state "
                         f"dict: {', '.join(not_tensors[:20])}" + (" …" if len(not_tensors) > 20 else ""))
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        new = key.removeprefix("module.")
        if new in out:
            raise ValueError(f"load_official_weights: {where}: {key!r} and another key both become {new!r} once "
                             f"'module.' is stripped")
        out[new] = value
    return out


def _all_finite(tensor: Tensor) -> bool:
    # A NaN or inf anywhere makes the sum non-finite; only a finite sum that overflowed needs the full check.
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def load_official_weights(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping,
                          strict: bool = True) -> LoadReport:
    """Load a released Grounding DINO checkpoint (`groundingdino_swint_ogc.pth`, `groundingdino_swinb_cogcoor.pth`)
    or an already loaded dict into `model`, whose `state_dict()` uses the official names.

    * A path is read with torch.load(map_location="cpu", weights_only=True), memory-mapped when the file is in
      torch's zip format (no second in-memory copy of the weights). A missing path raises
      FileNotFoundError; an empty, truncated or corrupt file, or a pickle that is not a checkpoint, ValueError
      naming the path.
    * The weights are `checkpoint["model"]`, or the dict itself when it is flat; a leading `module.` is stripped.
    * `label_enc.weight` and `bert.embeddings.position_ids`, which the released files carry but the model does not
      use, are ignored (listed in the report).
    * Errors name every offending key, all in one WeightsMismatchError: shape mismatches, a floating value for an
      integer buffer (or the reverse), non-finite values, differing values for names the model ties to one tensor
      (the shared box head), and, when `strict` (the default), missing and unexpected keys.
    * Floating values are cast to the model's dtype by `load_state_dict`.

    Returns a LoadReport (loaded / ignored / missing / unexpected key lists).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_official_weights: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        where = repr(os.fspath(path_or_state_dict))
        checkpoint = _read_checkpoint(path_or_state_dict)
    elif isinstance(path_or_state_dict, Mapping):
        where = "the given dict"
        checkpoint = path_or_state_dict
    else:
        raise TypeError("load_official_weights: path_or_state_dict must be a path or a dict, got "
                        f"{type(path_or_state_dict).__name__}")
    sd = _extract(checkpoint, where)

    target = model.state_dict(keep_vars=True)
    report = LoadReport()
    report.ignored = [k for k in sd if k in KNOWN_EXTRA_CHECKPOINT_KEYS and k not in target]
    sd = {k: v for k, v in sd.items() if k not in report.ignored}
    report.missing = [k for k in target if k not in sd]
    report.unexpected = [k for k in sd if k not in target]

    problems: list[str] = []
    for key, value in sd.items():
        if key not in target:
            continue
        want = target[key]
        if value.shape != want.shape:
            problems.append(f"{key}: checkpoint shape {tuple(value.shape)} vs model {tuple(want.shape)}")
        elif value.is_floating_point() != want.is_floating_point() or value.is_complex() != want.is_complex():
            problems.append(f"{key}: checkpoint dtype {value.dtype} vs model {want.dtype}")
        elif value.is_floating_point() and not _all_finite(value):
            problems.append(f"{key}: non-finite values")
    # Names that share one tensor in the model (the shared box head) must agree, or the last one loaded would win.
    by_tensor: dict[int, list[str]] = {}
    for key, tensor in target.items():
        by_tensor.setdefault(id(tensor), []).append(key)
    for names in by_tensor.values():
        present = [n for n in names if n in sd and sd[n].shape == target[n].shape]
        if any(not torch.equal(sd[present[0]], sd[n]) for n in present[1:]):
            problems.append("tied to one tensor in the model but different in the checkpoint: " + ", ".join(present))
    if strict and report.missing:
        problems.append(f"{len(report.missing)} missing key(s): " + ", ".join(report.missing))
    if strict and report.unexpected:
        problems.append(f"{len(report.unexpected)} unexpected key(s): " + ", ".join(report.unexpected))
    if problems:
        raise WeightsMismatchError(f"load_official_weights: {where} does not fit {type(model).__name__}: "
                                   + "; ".join(problems))
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    report.loaded = [k for k in sd if k in target]
    return report


# --------------------------------------------------------------------------------------------------------------
# Whole models


def _unsupported_config(config) -> list[str]:
    """What in a GroundingDinoConfig this package's GroundingDINO cannot reproduce."""
    problems = []
    fixed = {"two_stage": True, "embedding_init_target": True, "query_dim": 4, "decoder_bbox_embed_share": True,
             "two_stage_bbox_embed_share": False, "position_embedding_type": "sine",
             "positional_embedding_temperature": 20, "activation_function": "relu", "layer_norm_eps": 1e-5}
    for name, want in fixed.items():
        if getattr(config, name, want) != want:
            problems.append(f"{name}={getattr(config, name)!r} (supported: {want!r})")
    if config.encoder_attention_heads != config.decoder_attention_heads:
        problems.append(f"encoder_attention_heads={config.encoder_attention_heads} != decoder_attention_heads="
                        f"{config.decoder_attention_heads} (one nheads)")
    if config.encoder_ffn_dim != config.decoder_ffn_dim:
        problems.append(f"encoder_ffn_dim={config.encoder_ffn_dim} != decoder_ffn_dim={config.decoder_ffn_dim} "
                        f"(one dim_feedforward)")
    backbone, text = config.backbone_config, config.text_config
    if getattr(backbone, "model_type", None) != "swin":
        problems.append(f"backbone_config.model_type={getattr(backbone, 'model_type', None)!r} (supported: 'swin')")
    else:
        if list(backbone.out_indices) != [2, 3, 4]:
            problems.append(f"backbone_config.out_indices={list(backbone.out_indices)} (supported: [2, 3, 4])")
        swin_fixed = {"patch_size": 4, "num_channels": 3, "mlp_ratio": 4.0, "qkv_bias": True, "hidden_act": "gelu",
                      "use_absolute_embeddings": False, "layer_norm_eps": 1e-5}
        for name, want in swin_fixed.items():
            if getattr(backbone, name, want) != want:
                problems.append(f"backbone_config.{name}={getattr(backbone, name)!r} (supported: {want!r})")
    if getattr(text, "model_type", None) != "bert":
        problems.append(f"text_config.model_type={getattr(text, 'model_type', None)!r} (supported: 'bert')")
    return problems


def _model_kwargs_from_config(config) -> dict:
    return {"num_queries": config.num_queries, "d_model": config.d_model, "nheads": config.encoder_attention_heads,
            "num_encoder_layers": config.encoder_layers, "num_decoder_layers": config.decoder_layers,
            "dim_feedforward": config.encoder_ffn_dim, "dropout": float(config.dropout),
            "num_feature_levels": config.num_feature_levels, "enc_n_points": config.encoder_n_points,
            "dec_n_points": config.decoder_n_points, "fusion_drop_path": float(config.fusion_droppath),
            "max_text_len": config.max_text_len}


def from_transformers(hf_model_or_state_dict, config=None, tokenizer=None, **overrides):
    """This package's GroundingDINO (eval mode) with the weights of a transformers
    `GroundingDinoForObjectDetection`: the model itself, a local directory holding one (config.json + weights;
    never downloads), or its state dict together with its `GroundingDinoConfig` (`config`).

    Architecture arguments come from the config; `tokenizer` and `overrides` (GroundingDINO keyword arguments)
    are passed on. Our defaults stay official where transformers differs (SPEC §5.10): pass
    `inverse_sigmoid_eps=1e-5` to reproduce transformers' outputs. Configurations the model cannot express
    (another backbone, unshared box heads, encoder/decoder head counts that differ, …) raise ValueError naming
    each field."""
    source = hf_model_or_state_dict
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"from_transformers: no such model directory: {path!r}")
        from transformers import GroundingDinoForObjectDetection
        source = GroundingDinoForObjectDetection.from_pretrained(path, local_files_only=True)
    if isinstance(source, nn.Module):
        if config is not None:
            raise ValueError("from_transformers: config is only for a state dict; a model brings its own")
        config = getattr(source, "config", None)
        if getattr(config, "model_type", None) != "grounding-dino":
            raise TypeError(f"from_transformers: expected a transformers GroundingDinoForObjectDetection, got "
                            f"{type(source).__name__}")
        state = source.state_dict()
    elif isinstance(source, Mapping):
        if getattr(config, "model_type", None) != "grounding-dino":
            raise TypeError("from_transformers: a state dict needs its GroundingDinoConfig as config, got "
                            f"{type(config).__name__}")
        state = source
    else:
        raise TypeError("from_transformers: hf_model_or_state_dict must be a GroundingDinoForObjectDetection, a "
                        f"directory or a state dict, got {type(source).__name__}")
    problems = _unsupported_config(config)
    if problems:
        raise ValueError("from_transformers: this GroundingDinoConfig cannot be expressed by GroundingDINO: "
                         + "; ".join(problems))
    from .model import GroundingDINO
    from .swin import SwinTransformer
    from .text import build_text_encoder

    swin = config.backbone_config
    backbone = SwinTransformer(embed_dim=swin.embed_dim, depths=tuple(swin.depths), num_heads=tuple(swin.num_heads),
                               window_size=swin.window_size)
    kwargs = _model_kwargs_from_config(config)
    kwargs.update(overrides)
    model = GroundingDINO(backbone, build_text_encoder(config.text_config), tokenizer, **kwargs)
    load_official_weights(model, state_dict_from_transformers(state, config))
    return model.eval()


def _swin_settings(state_dict: Mapping[str, Tensor]) -> dict:
    """embed_dim, depths, num_heads, window_size of the official-named Swin backbone in a state dict."""
    prefix = "backbone.0."
    if prefix + "patch_embed.proj.weight" not in state_dict:
        raise ValueError("to_transformers: the model's backbone is not a Swin transformer with the official names "
                         "(no backbone.0.patch_embed.proj.weight); transformers' GroundingDino needs one")
    depths, heads, windows = {}, {}, set()
    for key, value in state_dict.items():
        m = re.match(r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$", key)
        if m is not None:
            layer, block = int(m.group(1)), int(m.group(2))
            depths[layer] = max(depths.get(layer, 0), block + 1)
            heads[layer] = value.shape[1]
            windows.add(_window_from_table(key, value))
    if len(windows) != 1 or sorted(depths) != list(range(len(depths))):
        raise ValueError(f"to_transformers: cannot read one Swin layout off the backbone (windows {sorted(windows)}, "
                         f"layers {sorted(depths)})")
    return {"embed_dim": state_dict[prefix + "patch_embed.proj.weight"].shape[0],
            "depths": [depths[i] for i in range(len(depths))], "num_heads": [heads[i] for i in range(len(heads))],
            "window_size": windows.pop()}


def to_transformers(model: nn.Module):
    """A transformers `GroundingDinoForObjectDetection` (eval mode) with the architecture and weights of this
    package's GroundingDINO (Swin backbone, BERT text encoder).

    transformers fixes two choices ours leaves open (SPEC §5.10): its inverse-sigmoid eps is 1e-5 (ours defaults to
    the official 1e-3) and it builds the text-enhancer masks per image (our `text_mask_layout="correct"`), so outputs
    agree for models built with `inverse_sigmoid_eps=1e-5`. The BERT pooler (unused) is not carried over."""
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        SwinConfig,
    )

    from .model import GroundingDINO

    if not isinstance(model, GroundingDINO):
        raise TypeError(f"to_transformers: expected a dinokernels GroundingDINO, got {type(model).__name__}")
    state = model.state_dict()
    swin = _swin_settings(state)
    encoder, decoder = model.transformer.encoder, model.transformer.decoder
    fusion_drop = getattr(encoder.fusion_layers[0].drop_path, "drop_prob", None) or 0.0
    backbone_config = SwinConfig(**swin, out_features=["stage2", "stage3", "stage4"])
    config = GroundingDinoConfig(
        backbone_config=backbone_config, text_config=copy.deepcopy(model.bert.config), num_queries=model.num_queries,
        d_model=model.d_model, encoder_layers=len(encoder.layers), decoder_layers=len(decoder.layers),
        encoder_attention_heads=encoder.layers[0].self_attn.n_heads,
        decoder_attention_heads=decoder.layers[0].self_attn.num_heads,
        encoder_ffn_dim=encoder.layers[0].linear1.out_features, decoder_ffn_dim=decoder.layers[0].linear1.out_features,
        encoder_n_points=encoder.layers[0].self_attn.n_points, decoder_n_points=decoder.layers[0].cross_attn.n_points,
        num_feature_levels=model.num_feature_levels, max_text_len=model.max_text_len,
        dropout=encoder.layers[0].dropout.p, fusion_droppath=float(fusion_drop))
    hf = GroundingDinoForObjectDetection(config)
    hf.load_state_dict(state_dict_to_transformers(state), strict=True)
    return hf.eval()
