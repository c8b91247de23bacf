"""DINOv2 weights: the released files, block-chunked and training layouts, and transformers both ways.

* `load_official_weights(model, path_or_state_dict)`: a hub backbone file (flat `blocks.{i}.*`), a state dict of
  a block-chunked model (`blocks.{chunk}.{i}.*`), or a training checkpoint (`{"teacher": {"backbone.*",
  "dino_head.*", "ibot_head.*"}}`, optionally `module.`-prefixed) into any DinoVisionTransformer, whichever block
  layout it has. Files are read with `weights_only=True`. Strict by default: every missing, unexpected or
  mis-shaped key is named in one error (silent partial loads are a known pain: SPEC §3.11).
* `state_dict_to_transformers` / `state_dict_from_transformers`: our (official) names ↔ transformers'
  `Dinov2Model` / `Dinov2WithRegistersModel` names (qkv fused ↔ split, LayerScale, SwiGLU), and
  `from_transformers` / `to_transformers` for whole models, including a local transformers model directory.
"""
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ...layers import swiglu_hidden_features
from .vision_transformer import DinoVisionTransformer

__all__ = ["load_official_weights", "canonical_backbone_state_dict", "state_dict_to_transformers",
           "state_dict_from_transformers", "from_transformers", "to_transformers", "LoadReport"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.*)$")  # chunked: blocks.{chunk}.{index}.{rest}
_FLAT_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


class LoadReport(dict):
    """{"loaded": [keys], "ignored": [keys]} — what a load used and what it set aside on purpose."""


def _read(path_or_state_dict) -> Mapping[str, Any]:
    if isinstance(path_or_state_dict, Mapping):
        return path_or_state_dict
    path = os.fspath(path_or_state_dict)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dinov2.load_official_weights: no such file: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"dinov2.load_official_weights: {path} is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle of arbitrary objects
        raise ValueError(f"dinov2.load_official_weights: {path} is not a readable PyTorch checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def canonical_backbone_state_dict(source: Mapping[str, Any]) -> Tuple[Dict[str, Tensor], List[str]]:
    """Any supported layout → (flat backbone state dict with `blocks.{i}.*` keys, ignored keys).

    Unwraps `{"teacher": …}` (a training checkpoint; also `"model"`/`"state_dict"` wrappers), strips `module.`
    and `backbone.` prefixes, sets head weights (`dino_head.*`, `ibot_head.*`) aside as ignored, and flattens
    `blocks.{chunk}.{i}.*` to `blocks.{i}.*`."""
    sd = source
    for wrapper in ("teacher", "model", "state_dict"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
            break
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
        raise ValueError("dinov2.load_official_weights: the checkpoint is not a state dict (a mapping of names to "
                         "tensors), nor a training checkpoint with a 'teacher' entry")
    flat, ignored = {}, []
    for key, value in sd.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name.startswith(("dino_head.", "ibot_head.")):
            ignored.append(key)
            continue
        if name.startswith("backbone."):
            name = name[len("backbone."):]
        if not isinstance(value, Tensor):
            raise ValueError(f"dinov2.load_official_weights: entry {key!r} is a {type(value).__name__}, not a tensor")
        chunked = _BLOCK.match(name)
        if chunked:
            name = f"blocks.{chunked.group(2)}.{chunked.group(3)}"
        if name in flat:
            raise ValueError(f"dinov2.load_official_weights: key {name!r} appears twice after unwrapping")
        flat[name] = value
    return flat, ignored


def _model_key_of_flat(model: nn.Module) -> Dict[str, str]:
    """Flat `blocks.{i}.*` name → the model's own state-dict name (chunked or not)."""
    mapping = {}
    for name in model.state_dict():
        chunked = _BLOCK.match(name)
        mapping[f"blocks.{chunked.group(2)}.{chunked.group(3)}" if chunked else name] = name
    return mapping


def load_official_weights(model: DinoVisionTransformer, path_or_state_dict, strict: bool = True) -> LoadReport:
    """Loads released or training DINOv2 weights into `model` (see the module docstring). strict=False loads the
    keys that match in name and shape and reports the rest under "missing", "unexpected" and "mismatched"."""
    flat, ignored = canonical_backbone_state_dict(_read(path_or_state_dict))
    names = _model_key_of_flat(model)
    own = model.state_dict()
    missing = [k for k in names if k not in flat]
    unexpected = [k for k in flat if k not in names]
    mismatched = [f"{k}: checkpoint {tuple(flat[k].shape)} vs model {tuple(own[names[k]].shape)}"
                  for k in flat if k in names and tuple(flat[k].shape) != tuple(own[names[k]].shape)]
    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
        raise ValueError("dinov2.load_official_weights: the checkpoint does not fit the model — " + " | ".join(parts))
    usable = {names[k]: v for k, v in flat.items()
              if k in names and tuple(v.shape) == tuple(own[names[k]].shape)}
    model.load_state_dict(usable, strict=strict)
    report = LoadReport(loaded=sorted(usable), ignored=ignored)
    if not strict:
        report.update(missing=missing, unexpected=unexpected, mismatched=mismatched)
    return report


# ---- transformers ----------------------------------------------------------------------------------------------

# (our suffix, transformers suffix spellings: 5.x first, then 4.x)
_LAYER_RENAMES = [
    ("norm1", ["norm1"]), ("norm2", ["norm2"]),
    ("attn.proj", ["attention.o_proj", "attention.output.dense"]),
    ("ls1.gamma", ["layer_scale1.lambda1"]), ("ls2.gamma", ["layer_scale2.lambda1"]),
    ("mlp.fc1", ["mlp.fc1"]), ("mlp.fc2", ["mlp.fc2"]),
    ("mlp.w3", ["mlp.down_proj", "mlp.weights_out"]),
]
_QKV = [("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        ("attention.attention.query", "attention.attention.key", "attention.attention.value")]
_SWIGLU_IN = [("mlp.gate_proj", "mlp.up_proj"), ("mlp.weights_in",)]
_TOP = [("cls_token", "embeddings.cls_token"), ("mask_token", "embeddings.mask_token"),
        ("pos_embed", "embeddings.position_embeddings"), ("register_tokens", "embeddings.register_tokens"),
        ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
        ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
        ("norm.weight", "layernorm.weight"), ("norm.bias", "layernorm.bias")]


def _strip_hf_prefix(sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Keys of a Dinov2Model, or of a model wrapping it as `dinov2.` (heads dropped by the caller)."""
    out = {}
    for k, v in sd.items():
        out[k[len("dinov2."):] if k.startswith("dinov2.") else k] = v
    return out


def state_dict_from_transformers(hf_state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """transformers Dinov2Model / Dinov2WithRegistersModel state dict (5.x or 4.x names) → our flat
    `blocks.{i}.*` state dict. Every tensor must be used: a leftover key is an error naming it."""
    hf = _strip_hf_prefix(hf_state_dict)
    used, out = set(), {}

    def take(key: str) -> Tensor:
        used.add(key)
        return hf[key]

    for ours, theirs in _TOP:
        if theirs in hf:
            out[ours] = take(theirs)
    layers = sorted({int(m.group(1)) for m in (re.match(r"^encoder\.layer\.(\d+)\.", k) for k in hf) if m})
    for i in layers:
        pre = f"encoder.layer.{i}."
        for ours, spellings in _LAYER_RENAMES:
            for theirs in spellings:
                for p in ("weight", "bias", ""):
                    key = pre + theirs + (f".{p}" if p else "")
                    if key in hf and key not in used:
                        out[f"blocks.{i}.{ours}" + (f".{p}" if p else "")] = take(key)
        for q, k, v in _QKV:
            for p in ("weight", "bias"):
                if pre + f"{q}.{p}" in hf:
                    out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([take(pre + f"{n}.{p}") for n in (q, k, v)], 0)
        for names in _SWIGLU_IN:
            for p in ("weight", "bias"):
                if pre + f"{names[0]}.{p}" in hf:
                    out[f"blocks.{i}.mlp.w12.{p}"] = torch.cat([take(pre + f"{n}.{p}") for n in names], 0)
    leftover = [k for k in hf if k not in used]
    if leftover:
        raise ValueError(f"dinov2.state_dict_from_transformers: keys not understood: {', '.join(leftover)}")
    return out


def state_dict_to_transformers(state_dict: Mapping[str, Tensor], target_keys: Optional[List[str]] = None
                               ) -> Dict[str, Tensor]:
    """Our state dict (flat or chunked blocks) → transformers names. `target_keys`: the keys of the transformers
    model to fill (picks 5.x or 4.x spellings); default: 5.x names."""
    flat, _ = canonical_backbone_state_dict(state_dict)
    targets = set(target_keys) if target_keys is not None else None

    def spelling(options: List[str], pre: str, suffix: str) -> str:
        for o in options:
            if targets is None or pre + o + suffix in targets:
                return o
        return options[0]

    out, used = {}, set()
    for ours, theirs in _TOP:
        if ours in flat:
            out[theirs] = flat[ours]
            used.add(ours)
    layers = sorted({int(m.group(1)) for m in (_FLAT_BLOCK.match(k) for k in flat) if m})
    for i in layers:
        pre = f"encoder.layer.{i}."
        for ours, spellings in _LAYER_RENAMES:
            for p in ("weight", "bias", ""):
                key = f"blocks.{i}.{ours}" + (f".{p}" if p else "")
                if key in flat:
                    sfx = f".{p}" if p else ""
                    out[pre + spelling(spellings, pre, sfx) + sfx] = flat[key]
                    used.add(key)
        for p in ("weight", "bias"):
            key = f"blocks.{i}.attn.qkv.{p}"
            if key in flat:
                names = _QKV[0] if targets is None or pre + f"{_QKV[0][0]}.{p}" in targets else _QKV[1]
                for n, part in zip(names, flat[key].chunk(3, 0)):
                    out[pre + f"{n}.{p}"] = part
                used.add(key)
            key = f"blocks.{i}.mlp.w12.{p}"
            if key in flat:
                names = _SWIGLU_IN[0] if targets is None or pre + f"{_SWIGLU_IN[0][0]}.{p}" in targets \
                    else _SWIGLU_IN[1]
                parts = flat[key].chunk(len(names), 0) if len(names) > 1 else [flat[key]]
                for n, part in zip(names, parts):
                    out[pre + f"{n}.{p}"] = part
                used.add(key)
    leftover = [k for k in flat if k not in used]
    if leftover:
        raise ValueError(f"dinov2.state_dict_to_transformers: keys not understood: {', '.join(leftover)}")
    return out


def _config_kwargs_from_transformers(config) -> Dict[str, Any]:
    """Our constructor arguments for a transformers Dinov2(WithRegisters)Config."""
    act = getattr(config, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"dinov2.from_transformers: hidden_act {act!r} is not supported (only 'gelu')")
    hidden = config.hidden_size
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    return dict(img_size=config.image_size, patch_size=config.patch_size, in_chans=config.num_channels,
                embed_dim=hidden, depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
                mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias, init_values=config.layerscale_value,
                ffn_layer="swiglufused" if config.use_swiglu_ffn else "mlp", block_chunks=0,
                num_register_tokens=registers,
                # transformers resizes to an explicit size: no offset; antialias in the registers model only.
                interpolate_offset=0.0, interpolate_antialias=registers > 0,
                drop_path_rate=getattr(config, "drop_path_rate", 0.0))


def from_transformers(hf_model_or_dir, **overrides) -> DinoVisionTransformer:
    """Our DinoVisionTransformer from a transformers Dinov2Model / Dinov2WithRegistersModel, or from a local model
    directory (config.json + weights; never downloads). `overrides` replace constructor arguments (e.g.
    interpolate_offset=0.1 for the official non-`_reg` interpolation instead of transformers')."""
    if isinstance(hf_model_or_dir, (str, os.PathLike)):
        path = os.fspath(hf_model_or_dir)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"dinov2.from_transformers: no such model directory: {path}")
        from transformers import AutoModel
        hf_model_or_dir = AutoModel.from_pretrained(path, local_files_only=True)
    config = getattr(hf_model_or_dir, "config", None)
    if config is None or getattr(config, "model_type", "") not in ("dinov2", "dinov2_with_registers"):
        raise TypeError("dinov2.from_transformers: expected a transformers Dinov2Model or Dinov2WithRegistersModel "
                        "(or a directory holding one)")
    kwargs = _config_kwargs_from_transformers(config)
    kwargs.update(overrides)
    model = DinoVisionTransformer(**kwargs)
    hf_sd = {k: v for k, v in hf_model_or_dir.state_dict().items() if not k.startswith("classifier.")}
    load_official_weights(model, state_dict_from_transformers(hf_sd))
    return model


def to_transformers(model: DinoVisionTransformer):
    """A transformers Dinov2Model (or Dinov2WithRegistersModel when the model has registers) with our weights."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    blocks = model._block_list()
    first = blocks[0]
    swiglu = hasattr(first.mlp, "w12")
    if not swiglu and not hasattr(first.mlp, "fc1"):
        raise ValueError("dinov2.to_transformers: only 'mlp' and 'swiglu' feed-forward layers have a transformers "
                         "equivalent")
    mlp_hidden = first.mlp.fc1.out_features if not swiglu else None
    ls = getattr(first.ls1, "gamma", None)
    common = dict(hidden_size=model.embed_dim, num_hidden_layers=len(blocks), num_attention_heads=model.num_heads,
                  image_size=model.patch_embed.img_size, patch_size=model.patch_size,
                  num_channels=model.patch_embed.proj.in_channels, qkv_bias=first.attn.qkv.bias is not None,
                  layerscale_value=1.0 if ls is None else float(first.ls1.init_values), use_swiglu_ffn=swiglu,
                  layer_norm_eps=model.norm.eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  drop_path_rate=0.0)
    # transformers' config has an integer mlp_ratio only (the SwiGLU width follows from it by the same 2/3 rule).
    width = first.mlp.w3.in_features if swiglu else mlp_hidden
    ratios = [r for r in range(1, 17) if (swiglu_hidden_features(model.embed_dim * r) if swiglu
                                         else model.embed_dim * r) == width]
    if not ratios:
        raise ValueError(f"dinov2.to_transformers: a feed-forward width of {width} is no integer mlp_ratio of "
                         f"{model.embed_dim}, which transformers' config requires")
    common["mlp_ratio"] = ratios[0]
    if ls is None:
        raise ValueError("dinov2.to_transformers: transformers' Dinov2 always has LayerScale; this model has none")
    if model.num_register_tokens:
        hf = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=model.num_register_tokens,
                                                                **common))
    else:
        hf = Dinov2Model(Dinov2Config(**common))
    target = hf.state_dict()
    converted = state_dict_to_transformers(model.state_dict(), list(target))
    missing = [k for k in target if k not in converted]
    extra = [k for k in converted if k not in target]
    bad = [k for k in converted if k in target and converted[k].shape != target[k].shape]
    if missing or extra or bad:
        raise ValueError(f"dinov2.to_transformers: layout mismatch (missing {missing}, unexpected {extra}, "
                         f"mis-shaped {bad})")
    hf.load_state_dict(converted, strict=True)
    return hf.eval()
