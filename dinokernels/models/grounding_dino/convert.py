"""Grounding DINO weights (SPEC §5.9, §5.10): loading the released `.pth` files, and converting state dicts between
the official parameter names (which this package's model uses) and transformers' `GroundingDinoForObjectDetection`
(transformers 5.x names).

The mapping below was derived by listing the keys of both models built with the Swin-T and Swin-B settings and pairing
them one to one. Differences that are not plain renames:

* fused vs split attention: official Swin `attn.qkv` (3C × C) ↔ transformers `attention.{q,k,v}_proj`; official
  `nn.MultiheadAttention` `in_proj_weight` / `in_proj_bias` ↔ transformers `{query,key,value}.{weight,bias}`.
  The fused tensor is the three projections stacked along dim 0 in the order q, k, v.
* official Swin `attn.relative_position_index` is a persistent int64 buffer; transformers recomputes it (not in its
  state dict). Going to transformers it must equal the standard index for its window (checked); coming back it is
  rebuilt from the window size (read off `relative_position_bias_table`, (2w−1)² rows).
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
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..dino.checkpoint import WeightsMismatchError

__all__ = [
    "KNOWN_EXTRA_CHECKPOINT_KEYS",
    "LoadReport",
    "WeightsMismatchError",
    "load_official_weights",
    "state_dict_from_transformers",
    "state_dict_to_transformers",
    "swin_relative_position_index",
]

# Keys the released files hold although the inference model does not create them (manifest
# `known_extra_checkpoint_keys`): the training code's denoising label embedding, and BERT's position-id buffer,
# persistent in transformers before 4.31.
KNOWN_EXTRA_CHECKPOINT_KEYS = ("label_enc.weight", "bert.embeddings.position_ids")

_HF_SWIN = "model.backbone.conv_encoder.model."  # transformers' SwinBackbone inside GroundingDinoForObjectDetection

# (official prefix, transformers prefix): a rule matches a key equal to the prefix or starting with prefix + ".";
# the remainder is kept. {i}, {j} stand for layer / block indices. Fused attention is handled separately.
_RULES: list[tuple[str, str]] = [
    # Swin backbone
    ("backbone.0.patch_embed.proj", _HF_SWIN + "swin.embeddings.patch_embeddings.projection"),
    ("backbone.0.patch_embed.norm", _HF_SWIN + "swin.embeddings.norm"),
    ("backbone.0.layers.{i}.blocks.{j}.norm1", _HF_SWIN + "swin.encoder.layers.{i}.blocks.{j}.layernorm_before"),
    ("backbone.0.layers.{i}.blocks.{j}.norm2", _HF_SWIN + "swin.encoder.layers.{i}.blocks.{j}.layernorm_after"),
    ("backbone.0.layers.{i}.blocks.{j}.attn.proj", _HF_SWIN + "swin.encoder.layers.{i}.blocks.{j}.attention.o_proj"),
    ("backbone.0.layers.{i}.blocks.{j}.attn.relative_position_bias_table",
     _HF_SWIN + "swin.encoder.layers.{i}.blocks.{j}.attention.relative_position_bias.relative_position_bias_table"),
    ("backbone.0.layers.{i}.blocks.{j}.mlp", _HF_SWIN + "swin.encoder.layers.{i}.blocks.{j}.mlp"),
    ("backbone.0.layers.{i}.downsample", _HF_SWIN + "swin.encoder.layers.{i}.downsample"),
    # official norm{k} normalises the output of layers.{k}, transformers' stage{k+1}
    ("backbone.0.norm0", _HF_SWIN + "hidden_states_norms.stage1"),
    ("backbone.0.norm1", _HF_SWIN + "hidden_states_norms.stage2"),
    ("backbone.0.norm2", _HF_SWIN + "hidden_states_norms.stage3"),
    ("backbone.0.norm3", _HF_SWIN + "hidden_states_norms.stage4"),
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
    ("transformer.encoder.fusion_layers.{i}.attn.out_l_proj", "model.encoder.layers.{i}.fusion_layer.attn.out_text_proj"),
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

_SWIN_BLOCK = r"backbone\.0\.layers\.\d+\.blocks\.\d+\."
_SWIN_QKV = re.compile(r"^(" + _SWIN_BLOCK + r")attn\.qkv\.(weight|bias)$")
_SWIN_INDEX = re.compile(r"^(" + _SWIN_BLOCK + r")attn\.relative_position_index$")
_MHA_IN_PROJ = re.compile(r"^(.*)\.in_proj_(weight|bias)$")
_HF_SWIN_QKV = re.compile(r"^(" + re.escape(_HF_SWIN) + r"swin\.encoder\.layers\.\d+\.blocks\.\d+\.)attention\."
                          r"([qkv])_proj\.(weight|bias)$")
# transformers' split MultiheadAttention projections (BERT's attention.self.{query,key,value} are separate there
# too and stay separate, so the text backbone is excluded).
_HF_MHA_SPLIT = re.compile(r"^(model\.(?:encoder|decoder)\..*)\.(query|key|value)\.(weight|bias)$")
_HF_SWIN_FINAL_NORM = re.compile(r"^" + re.escape(_HF_SWIN) + r"swin\.layernorm\.(weight|bias)$")
_POOLER = re.compile(r"^bert\.pooler\.dense\.(weight|bias)$")


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile("^" + pattern + r"(?P<rest>\..*)?$")


_TO_HF = [(_compile(src), dst) for src, dst in _RULES]
_FROM_HF = [(_compile(dst), src) for src, dst in _RULES]


def _rename(key: str, rules) -> str | None:
    """The key renamed by the first rule that matches it, or None."""
    for pattern, template in rules:
        m = pattern.match(key)
        if m is not None:
            groups = m.groupdict()
            out = template.replace("{i}", groups.get("i") or "").replace("{j}", groups.get("j") or "")
            return out + (groups["rest"] or "")
    return None


def swin_relative_position_index(window_size: int) -> Tensor:
    """(w², w²) int64: for token pairs (p, q) of a w×w window, the row of the relative position bias table,
    (dy + w − 1)·(2w − 1) + (dx + w − 1) with (dy, dx) = position(p) − position(q)."""
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window_size - 1
    dx = xs[:, None] - xs[None, :] + window_size - 1
    return dy * (2 * window_size - 1) + dx


def _window_from_table(key: str, table: Tensor) -> int:
    rows = table.shape[0]
    side = round(rows ** 0.5)
    if table.dim() != 2 or side * side != rows or side % 2 == 0:
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


def state_dict_to_transformers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official-named Grounding DINO state dict → transformers `GroundingDinoForObjectDetection` state dict.

    `state_dict` is what this package's `GroundingDINO.state_dict()` returns (the official names, without a
    `module.` prefix or the released files' extra keys). Fused q/k/v tensors are split; the Swin relative position
    indices are checked against the standard ones and dropped; `bert.pooler.*` is dropped; transformers' unused
    `swin.layernorm` is added as the identity. Raises ValueError naming every key it cannot place.
    """
    _check_state_dict(state_dict, "state_dict")
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    bad_index: list[str] = []
    last_stage_norm = None
    for key, value in state_dict.items():
        if _POOLER.match(key):
            continue
        m = _SWIN_INDEX.match(key)
        if m is not None:
            table_key = m.group(1) + "attn.relative_position_bias_table"
            if table_key not in state_dict:
                unmapped.append(key)
                continue
            window = _window_from_table(table_key, state_dict[table_key])
            if not torch.equal(value.cpu(), swin_relative_position_index(window)):
                bad_index.append(key)
            continue
        m = _SWIN_QKV.match(key)
        if m is not None:
            prefix = _rename(m.group(1) + "attn.proj", _TO_HF)[: -len("o_proj")]
            for letter, part in zip("qkv", _split3(key, value)):
                out[f"{prefix}{letter}_proj.{m.group(2)}"] = part
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
        # the widest block norm is the last stage's (its width is what transformers' final norm needs)
        if key.startswith("backbone.0.layers.") and key.endswith(".norm1.weight") and (
                last_stage_norm is None or value.shape[0] >= last_stage_norm.shape[0]):
            last_stage_norm = value
    if unmapped:
        raise ValueError("state_dict_to_transformers: no transformers name for these keys: " + ", ".join(unmapped))
    if bad_index:
        raise ValueError("state_dict_to_transformers: these Swin relative_position_index buffers differ from the "
                         "standard index (transformers recomputes it and cannot hold another): " + ", ".join(bad_index))
    if last_stage_norm is not None:
        # transformers builds a plain SwinModel's final LayerNorm inside its Swin backbone but never calls it.
        out[_HF_SWIN + "swin.layernorm.weight"] = torch.ones_like(last_stage_norm)
        out[_HF_SWIN + "swin.layernorm.bias"] = torch.zeros_like(last_stage_norm)
    return out


def state_dict_from_transformers(hf_state_dict: Mapping[str, Tensor], config=None) -> dict[str, Tensor]:
    """transformers `GroundingDinoForObjectDetection` state dict (5.x names) → official-named state dict, loadable
    into this package's `GroundingDINO` strictly.

    q/k/v projections are fused (stacked q, k, v along dim 0); Swin relative position indices are rebuilt from each
    block's bias table; `bert.pooler.*` (absent in transformers, unused) is filled with zeros; transformers' unused
    `swin.layernorm` is dropped. `config` (a `GroundingDinoConfig`, optional) is only checked against the weights
    (Swin window size, text hidden size). Raises ValueError naming every key it cannot place.
    """
    _check_state_dict(hf_state_dict, "hf_state_dict")
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    split: dict[tuple[str, str], dict[str, Tensor]] = {}  # (official key, order) → {q/k/v: tensor}
    for key, value in hf_state_dict.items():
        if _HF_SWIN_FINAL_NORM.match(key):
            continue
        m = _HF_SWIN_QKV.match(key)
        if m is not None:
            block = _rename(m.group(1) + "attention.o_proj", _FROM_HF)
            target = block[: -len("proj")] + "qkv." + m.group(3)
            split.setdefault((target, "qkv"), {})[m.group(2)] = value
            continue
        m = _HF_MHA_SPLIT.match(key)
        if m is not None:
            module = _rename(m.group(1), _FROM_HF)
            if module is None:
                unmapped.append(key)
                continue
            target = f"{module}.in_proj_{m.group(3)}"
            split.setdefault((target, "mha"), {})[m.group(2)] = value
            continue
        new = _rename(key, _FROM_HF)
        if new is None:
            unmapped.append(key)
            continue
        out[new] = value
    incomplete = []
    for (target, kind), parts in split.items():
        names = ("q", "k", "v") if kind == "qkv" else ("query", "key", "value")
        if set(parts) != set(names):
            incomplete.append(f"{target} (has {sorted(parts)})")
            continue
        shapes = {tuple(parts[n].shape) for n in names}
        if len(shapes) != 1:
            incomplete.append(f"{target} (q/k/v shapes differ: {sorted(shapes)})")
            continue
        out[target] = torch.cat([parts[n] for n in names], dim=0)
    if unmapped or incomplete:
        msg = []
        if unmapped:
            msg.append("no official name for these keys: " + ", ".join(unmapped))
        if incomplete:
            msg.append("incomplete or inconsistent q/k/v groups: " + ", ".join(incomplete))
        raise ValueError("state_dict_from_transformers: " + "; ".join(msg))

    # Buffers and parameters transformers does not hold.
    for key in list(out):
        m = re.match(r"^(" + _SWIN_BLOCK + r")attn\.relative_position_bias_table$", key)
        if m is not None:
            window = _window_from_table(key, out[key])
            if config is not None and window != config.backbone_config.window_size:
                raise ValueError(f"state_dict_from_transformers: {key} implies window size {window}, config says "
                                 f"{config.backbone_config.window_size}")
            out[m.group(1) + "attn.relative_position_index"] = swin_relative_position_index(window).to(
                out[key].device)
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

    * A path is read with torch.load(map_location="cpu", weights_only=True). A missing path raises
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
