"""Grounding DINO text side (SPEC §5.3): caption preprocessing, special token ids, the sub-sentence attention mask
and position ids, a local-only BERT tokenizer and text encoder, batch tokenisation with character offsets.

Nothing here downloads: tokenizers and encoders come from local files, in-memory vocabularies or configs.
"""
import os
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["preprocess_caption", "special_token_ids", "sub_sentence_masks_and_position_ids", "SubSentenceMasks",
           "build_tokenizer", "tiny_vocab", "build_text_encoder", "tokenize_captions", "SPECIAL_TOKENS",
           "BERT_SPECIAL_TOKEN_IDS"]

# The delimiters of the sub-sentence mask, in the order the official code resolves them.
SPECIAL_TOKENS = ("[CLS]", "[SEP]", ".", "?")
# Their ids in bert-base-uncased (and in any vocabulary with the BERT layout, e.g. `tiny_vocab`).
BERT_SPECIAL_TOKEN_IDS = (101, 102, 1012, 1029)


def preprocess_caption(caption: str) -> str:
    """Official caption normalisation: lower-case, strip, append "." unless it already ends with one."""
    if not isinstance(caption, str):
        raise TypeError(f"preprocess_caption: caption must be a string, got {type(caption).__name__}")
    result = caption.lower().strip()
    if not result:
        raise ValueError(f"preprocess_caption: caption is empty or only whitespace: {caption!r}")
    return result if result.endswith(".") else result + "."


def special_token_ids(tokenizer) -> List[int]:
    """[CLS], [SEP], ".", "?" ids resolved through the tokenizer (as the original does; transformers hard-codes
    101, 102, 1012, 1029). Raises ValueError if the vocabulary lacks one of them."""
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is None:
        raise TypeError(f"special_token_ids: tokenizer must have convert_tokens_to_ids, got {type(tokenizer).__name__}")
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
    ids = []
    for token in SPECIAL_TOKENS:
        if vocab is not None and token not in vocab:
            raise ValueError(f"special_token_ids: the tokenizer's vocabulary has no {token!r}")
        ids.append(int(convert(token)))
    return ids


class SubSentenceMasks(NamedTuple):
    """attention_mask (B, T, T) bool, True = may attend (what BERT and the text enhancer take; negate it for
    nn.MultiheadAttention); position_ids (B, T) int64, the position of each token inside its phrase."""
    attention_mask: Tensor
    position_ids: Tensor


def sub_sentence_masks_and_position_ids(input_ids: Tensor, special_ids: Union[Tensor, Sequence[int]]
                                        ) -> SubSentenceMasks:
    """Sub-sentence self-attention mask and phrase position ids (SPEC §5.3).

    input_ids: (B, T) integer token ids. special_ids: the delimiter ids (e.g. `special_token_ids(tokenizer)`).

    Per row, the delimiters (tokens whose id is in special_ids) at columns c_0 < c_1 < … cut the row into blocks:
    block k is (c_{k−1}, c_k], the tokens after the previous delimiter up to and including this one (block 0
    starts at column 0). Tokens of a block attend to each other and get positions 0, 1, …; a block closed by a
    delimiter at column 0 or T−1, and tokens after the last delimiter, attend only to themselves, position 0.

    Difference from the official loop, for rows that do not start with a delimiter only (tokenizer output always
    starts with [CLS]): the official code starts its "previous delimiter" at column 0 and never resets it between
    rows, so such a row's first block would drop column 0 (row 0) or depend on the row before; here every row is
    independent and its first block starts at column 0, as in transformers.

    Returns SubSentenceMasks(attention_mask (B, T, T) bool, position_ids (B, T) int64), on input_ids' device.
    """
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"sub_sentence_masks_and_position_ids: input_ids must be a tensor, got "
                        f"{type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"sub_sentence_masks_and_position_ids: input_ids must be a (B, T) integer tensor, got "
                         f"{tuple(input_ids.shape)} {input_ids.dtype}")
    special = torch.as_tensor(special_ids, device=input_ids.device)
    if special.dim() != 1 or special.numel() == 0 or special.is_floating_point() or special.is_complex() or \
            special.dtype == torch.bool:
        raise ValueError(f"sub_sentence_masks_and_position_ids: special_ids must be a non-empty 1-D list of integer "
                         f"ids, got {tuple(special.shape)} {special.dtype}")
    b, t = input_ids.shape
    device = input_ids.device
    if b == 0 or t == 0:
        return SubSentenceMasks(torch.zeros(b, t, t, dtype=torch.bool, device=device),
                                torch.zeros(b, t, dtype=torch.long, device=device))
    is_delim = torch.isin(input_ids.long(), special.long())                 # (B, T)
    cols = torch.arange(t, device=device)
    # Delimiter columns of each row in increasing order, padded with T: delim_cols[:, k] closes block k.
    delim_cols = torch.where(is_delim, cols, t).sort(dim=1).values          # (B, T)
    # Block of each token = number of delimiters strictly before it.
    block = torch.cumsum(is_delim, dim=1) - is_delim.long()                 # (B, T), values in [0, T − 1]
    closing = delim_cols.gather(1, block)                                   # (B, T): T = no closing delimiter
    in_block = (closing != 0) & (closing != t - 1) & (closing != t)
    previous = torch.where(block > 0, delim_cols.gather(1, (block - 1).clamp_min(0)), -1)
    position_ids = torch.where(in_block, cols - previous - 1, 0)
    same_block = (block[:, :, None] == block[:, None, :]) & in_block[:, :, None] & in_block[:, None, :]
    attention_mask = same_block | torch.eye(t, dtype=torch.bool, device=device)
    return SubSentenceMasks(attention_mask, position_ids.long())


def tiny_vocab(words: Sequence[str]) -> List[str]:
    """A BERT-layout vocabulary (list of tokens, id = index) for tests and synthetic data: [PAD] 0, [unusedN]
    fillers, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, "." 1012, "?" 1029, then `words` (lower-cased, in
    order, duplicates and reserved tokens skipped) from 1030. Sub-word pieces are given as "##piece"."""
    if isinstance(words, str) or not all(isinstance(w, str) for w in words):
        raise TypeError("tiny_vocab: words must be a list of strings")
    layout = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}
    tokens = [layout.get(i, f"[unused{i}]") for i in range(1030)]
    seen = set(tokens)
    for w in words:
        w = w.strip().lower()
        if not w or any(c.isspace() for c in w):
            raise ValueError(f"tiny_vocab: word {w!r} must be one non-empty token without whitespace")
        if w not in seen:
            seen.add(w)
            tokens.append(w)
    return tokens


def _read_vocab_file(path: Path) -> Dict[str, int]:
    vocab: Dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            token = line.rstrip("\n").rstrip("\r")
            if token and token not in vocab:
                vocab[token] = len(vocab) if not vocab else max(vocab.values()) + 1
            elif not token:
                raise ValueError(f"build_tokenizer: {path} line {len(vocab) + 1} is empty")
    if not vocab:
        raise ValueError(f"build_tokenizer: vocabulary file {path} is empty")
    return vocab


def build_tokenizer(vocab):
    """Lower-casing BERT (WordPiece) tokenizer, never downloading.

    vocab: a list of tokens (id = index, e.g. `tiny_vocab(...)`), a dict token → id, a vocab.txt path (one token
    per line), or a local directory holding a saved tokenizer (tokenizer.json / tokenizer_config.json) or a
    vocab.txt. Returns a transformers `BertTokenizer` (tokenizers-backed in transformers 5.x, so it can return
    offset mappings)."""
    from transformers import BertTokenizer

    if isinstance(vocab, (list, tuple)):
        if not vocab or not all(isinstance(tok, str) and tok for tok in vocab):
            raise ValueError("build_tokenizer: a vocabulary list must be non-empty strings")
        if len(set(vocab)) != len(vocab):
            raise ValueError("build_tokenizer: the vocabulary list has duplicate tokens")
        vocab = {tok: i for i, tok in enumerate(vocab)}
    elif isinstance(vocab, (str, os.PathLike)):
        path = Path(vocab)
        if path.is_dir():
            if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
                return BertTokenizer.from_pretrained(str(path), local_files_only=True, do_lower_case=True)
            if not (path / "vocab.txt").is_file():
                raise FileNotFoundError(f"build_tokenizer: directory {path} has no tokenizer.json, "
                                        f"tokenizer_config.json or vocab.txt")
            path = path / "vocab.txt"
        elif not path.is_file():
            raise FileNotFoundError(f"build_tokenizer: vocab {str(path)!r} is neither a file nor a directory")
        vocab = _read_vocab_file(path)
    elif isinstance(vocab, dict):
        if not vocab or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
            raise ValueError("build_tokenizer: a vocabulary dict must map token strings to integer ids")
        if len(set(vocab.values())) != len(vocab):
            raise ValueError("build_tokenizer: the vocabulary dict gives two tokens the same id")
        vocab = dict(vocab)
    else:
        raise TypeError(f"build_tokenizer: vocab must be a token list, a dict, a file or a directory, got "
                        f"{type(vocab).__name__}")
    for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        if token not in vocab:
            raise ValueError(f"build_tokenizer: the vocabulary has no {token}")
    # transformers 5.x: `vocab=` (a `vocab_file=` argument would be silently ignored).
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def build_text_encoder(path_or_config):
    """transformers `BertModel` from a local directory (`from_pretrained(dir, local_files_only=True)`) or a
    `BertConfig` (random weights). It keeps its pooler (`add_pooling_layer=True`): the official checkpoints hold
    `bert.pooler.*`, though the model never uses its output."""
    from transformers import BertConfig, BertModel

    if isinstance(path_or_config, BertConfig):
        return BertModel(path_or_config, add_pooling_layer=True)
    if isinstance(path_or_config, (str, os.PathLike)):
        path = Path(path_or_config)
        if not path.is_dir():
            raise FileNotFoundError(f"build_text_encoder: {str(path)!r} is not a local directory (nothing is "
                                    f"downloaded)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"build_text_encoder: {path} has no config.json")
        return BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=True)
    raise TypeError(f"build_text_encoder: path_or_config must be a local directory or a BertConfig, got "
                    f"{type(path_or_config).__name__}")


def tokenize_captions(tokenizer, captions: Sequence[str], max_text_len: Optional[int] = 256) -> Dict[str, Tensor]:
    """Preprocess (`preprocess_caption`) and tokenise a batch, padded to the longest, then truncated to
    `max_text_len` tokens (None = no truncation). As officially, truncation happens after tokenisation, so a long
    caption loses its final [SEP].

    Returns a dict of (B, T) tensors: input_ids int64, attention_mask int64 (1 = real token), token_type_ids int64,
    and, when the tokenizer provides them, offset_mapping (B, T, 2) int64 character spans [start, end) into the
    *preprocessed* caption, `preprocess_caption(captions[i])` (special and padding tokens give (0, 0))."""
    if isinstance(captions, str):
        raise TypeError("tokenize_captions: captions must be a list of strings, not one string")
    if not isinstance(captions, (list, tuple)):
        raise TypeError(f"tokenize_captions: captions must be a list of strings, got {type(captions).__name__}")
    if not captions:
        raise ValueError("tokenize_captions: captions is empty")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise TypeError(f"tokenize_captions: captions[{i}] must be a string, got {type(c).__name__}")
        if not c.strip():
            raise ValueError(f"tokenize_captions: captions[{i}] is empty or only whitespace")
    if max_text_len is not None and (not isinstance(max_text_len, int) or isinstance(max_text_len, bool)
                                     or max_text_len < 1):
        raise ValueError(f"tokenize_captions: max_text_len must be a positive int or None, got {max_text_len!r}")
    texts = [preprocess_caption(c) for c in captions]
    with_offsets = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(texts, padding="longest", return_tensors="pt", return_offsets_mapping=with_offsets)
    out: Dict[str, Tensor] = {}
    input_ids = enc["input_ids"]
    for key in ("input_ids", "attention_mask", "token_type_ids", "offset_mapping"):
        value = enc.get(key)
        if value is None:
            if key == "attention_mask":
                value = torch.ones_like(input_ids)
            elif key == "token_type_ids":
                value = torch.zeros_like(input_ids)
            else:
                continue
        value = value.long()
        out[key] = value[:, :max_text_len] if max_text_len is not None else value
    return out
