"""Grounding DINO text utilities (dinokernels.models.grounding_dino.text): caption preprocessing, special ids, the
sub-sentence mask / position ids (SPEC §5.3 worked examples, a loop written here from the SPEC, and transformers'
own function), local tokenizers and BERT encoders (no downloads), batch tokenisation with offsets."""
import json
from pathlib import Path

import pytest
import torch

from dinokernels.models.grounding_dino.text import (
    build_text_encoder,
    build_tokenizer,
    preprocess_caption,
    special_token_ids,
    sub_sentence_masks_and_position_ids,
    tiny_vocab,
    tokenize_captions,
)

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel
from transformers.models.grounding_dino.modeling_grounding_dino import (
    generate_masks_with_special_tokens_and_transfer_map as hf_masks,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "official_keys"
SPECIAL = [101, 102, 1012, 1029]
CLS, SEP, DOT, QM = SPECIAL
WORDS = ["a", "cat", "dog", "red", "car", "on", "the", "left", "##s"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(tiny_vocab(WORDS))


def spec_loop(input_ids, special):
    """SPEC §5.3 step by step, one row at a time (first block of a row starts at column 0)."""
    b, t = input_ids.shape
    mask = torch.eye(t, dtype=torch.bool).repeat(b, 1, 1)
    pos = torch.zeros(b, t, dtype=torch.long)
    for r in range(b):
        prev = -1
        for col in range(t):
            if int(input_ids[r, col]) not in special:
                continue
            if col == 0 or col == t - 1:
                mask[r, col, col] = True
                pos[r, col] = 0
            else:
                mask[r, prev + 1:col + 1, prev + 1:col + 1] = True
                pos[r, prev + 1:col + 1] = torch.arange(col - prev)
            prev = col
    return mask, pos


def blocks(mask_row):
    """Set of attention blocks of one (T, T) mask, as sorted tuples of columns."""
    return {tuple(torch.nonzero(r).flatten().tolist()) for r in mask_row}


def test_preprocess_caption():
    assert preprocess_caption("  A Cat . Dog  ") == "a cat . dog."
    assert preprocess_caption("cat.") == "cat."
    assert preprocess_caption("Cat . ") == "cat ."
    with pytest.raises(ValueError, match="empty or only whitespace"):
        preprocess_caption("   \n")
    with pytest.raises(ValueError, match="empty"):
        preprocess_caption("")
    with pytest.raises(TypeError, match="caption must be a string"):
        preprocess_caption(3)


def test_special_token_ids(tokenizer):
    assert special_token_ids(tokenizer) == SPECIAL
    # resolved through the tokenizer, not hard-coded
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", "cat", "."]
    assert special_token_ids(build_tokenizer(vocab)) == [2, 3, 7, 5]
    with pytest.raises(ValueError, match="'\\?'"):
        special_token_ids(build_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."]))
    with pytest.raises(TypeError, match="convert_tokens_to_ids"):
        special_token_ids(object())


def test_worked_example_two_phrases():
    ids = torch.tensor([[CLS, 1031, DOT, 1032, DOT, SEP]])  # [CLS] cat . dog . [SEP]
    mask, pos = sub_sentence_masks_and_position_ids(ids, SPECIAL)
    assert mask.shape == (1, 6, 6) and mask.dtype == torch.bool and pos.dtype == torch.int64
    assert blocks(mask[0]) == {(0,), (1, 2), (3, 4), (5,)}
    assert pos.tolist() == [[0, 0, 1, 0, 1, 0]]


def test_worked_example_no_trailing_dot():
    ids = torch.tensor([[CLS, 1031, DOT, 1032, 1033, SEP]])  # [CLS] cat . dog red [SEP]: "dog red" has no block
    mask, pos = sub_sentence_masks_and_position_ids(ids, SPECIAL)
    assert blocks(mask[0]) == {(0,), (1, 2), (3,), (4,), (5,)}
    assert pos.tolist() == [[0, 0, 1, 0, 0, 0]]


def test_worked_example_padded_rows():
    ids = torch.tensor([[CLS, 1031, DOT, 1032, 1033, DOT, SEP],
                        [CLS, 1031, DOT, SEP, 0, 0, 0]])
    mask, pos = sub_sentence_masks_and_position_ids(ids, torch.tensor(SPECIAL))
    assert blocks(mask[0]) == {(0,), (1, 2), (3, 4, 5), (6,)}
    assert pos[0].tolist() == [0, 0, 1, 0, 1, 2, 0]
    # the padded row's [SEP] forms its own one-token block; padding attends only to itself
    assert blocks(mask[1]) == {(0,), (1, 2), (3,), (4,), (5,), (6,)}
    assert pos[1].tolist() == [0, 0, 1, 0, 0, 0, 0]


def test_delimiters_at_the_edges_and_adjacent():
    ids = torch.tensor([[DOT, 1031, 1032, QM, DOT, 1033, DOT]])  # delimiter at 0, adjacent ones, at T−1
    mask, pos = sub_sentence_masks_and_position_ids(ids, SPECIAL)
    assert blocks(mask[0]) == {(0,), (1, 2, 3), (4,), (5,), (6,)}
    assert pos.tolist() == [[0, 0, 1, 2, 0, 0, 0]]


def random_rows(generator, b, t, p_delim):
    ids = torch.randint(1030, 1040, (b, t), generator=generator)
    delim = torch.rand(b, t, generator=generator) < p_delim
    ids[delim] = torch.tensor(SPECIAL)[torch.randint(0, 4, (int(delim.sum()),), generator=generator)]
    return ids


@pytest.mark.parametrize("t", [1, 2, 3, 7, 32])
def test_against_spec_loop_and_transformers(t):
    g = torch.Generator().manual_seed(1000 + t)
    for p in (0.0, 0.15, 0.5, 1.0):
        ids = random_rows(g, 6, t, p)
        ids[0, 0] = CLS  # a tokenizer-like row among arbitrary ones
        mask, pos = sub_sentence_masks_and_position_ids(ids, SPECIAL)
        ref_mask, ref_pos = spec_loop(ids, set(SPECIAL))
        assert torch.equal(mask, ref_mask) and torch.equal(pos, ref_pos), ids
        hf_mask, hf_pos = hf_masks(ids, torch.tensor(SPECIAL))
        assert torch.equal(mask, hf_mask) and torch.equal(pos, hf_pos.long()), ids
        assert torch.equal(mask, mask.transpose(1, 2))


def test_int32_input_and_empty_batch():
    ids = torch.tensor([[CLS, 1031, DOT, SEP]], dtype=torch.int32)
    mask, pos = sub_sentence_masks_and_position_ids(ids, SPECIAL)
    assert pos.dtype == torch.int64 and pos.tolist() == [[0, 0, 1, 0]]
    mask, pos = sub_sentence_masks_and_position_ids(torch.zeros(0, 5, dtype=torch.long), SPECIAL)
    assert mask.shape == (0, 5, 5) and pos.shape == (0, 5)


def test_sub_sentence_bad_inputs():
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, T\) integer tensor"):
        sub_sentence_masks_and_position_ids(torch.zeros(2, 3), SPECIAL)
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, T\) integer tensor"):
        sub_sentence_masks_and_position_ids(torch.zeros(3, dtype=torch.long), SPECIAL)
    with pytest.raises(TypeError, match="input_ids must be a tensor"):
        sub_sentence_masks_and_position_ids([[101, 102]], SPECIAL)
    with pytest.raises(ValueError, match="special_ids"):
        sub_sentence_masks_and_position_ids(torch.zeros(1, 3, dtype=torch.long), [])
    with pytest.raises(ValueError, match="special_ids"):
        sub_sentence_masks_and_position_ids(torch.zeros(1, 3, dtype=torch.long), [1.5])


def test_tiny_vocab_layout():
    vocab = tiny_vocab(["Cat", "dog", "cat", "."])
    assert vocab[0] == "[PAD]" and vocab[100] == "[UNK]" and vocab[101] == "[CLS]" and vocab[102] == "[SEP]"
    assert vocab[103] == "[MASK]" and vocab[1012] == "." and vocab[1029] == "?"
    assert vocab[1030:] == ["cat", "dog"] and len(set(vocab)) == len(vocab)
    with pytest.raises(ValueError, match="without whitespace"):
        tiny_vocab(["two words"])
    with pytest.raises(TypeError, match="list of strings"):
        tiny_vocab("cat")


def test_build_tokenizer_sources(tokenizer, tmp_path):
    vocab = tiny_vocab(WORDS)
    expected = [101, 1030 + WORDS.index("red"), 1030 + WORDS.index("cat"), 1030 + WORDS.index("##s"), 1012, 102]
    assert tokenizer("RED Cats.")["input_ids"] == expected  # lower-cased, word pieces
    from_dict = build_tokenizer({tok: i for i, tok in enumerate(vocab)})
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    from_file = build_tokenizer(tmp_path / "vocab.txt")
    from_vocab_dir = build_tokenizer(str(tmp_path))
    saved = tmp_path / "saved"
    tokenizer.save_pretrained(saved)
    from_saved = build_tokenizer(saved)
    for tok in (from_dict, from_file, from_vocab_dir, from_saved):
        assert tok("RED Cats.")["input_ids"] == expected
        assert special_token_ids(tok) == SPECIAL


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        build_tokenizer(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        build_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"no \[CLS\]"):
        build_tokenizer(["[PAD]", "[UNK]", "[SEP]", "[MASK]", "cat"])
    with pytest.raises(ValueError, match="duplicate"):
        build_tokenizer(["[PAD]", "[PAD]"])
    with pytest.raises(TypeError, match="vocab must be"):
        build_tokenizer(12)
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        build_tokenizer(tmp_path / "empty.txt")


def test_text_encoder_keys_match_official_manifest():
    manifest = json.loads((FIXTURES / "groundingdino_swint_ogc.json").read_text())
    expected = [(k[len("bert."):], v) for k, v in manifest["keys"].items() if k.startswith("bert.")]
    assert any(k.startswith("pooler.") for k, _ in expected)
    with torch.device("meta"):  # bert-base sizes (110M parameters): shapes only
        bert = build_text_encoder(BertConfig())
    assert [(k, list(v.shape)) for k, v in bert.state_dict().items()] == expected


def test_text_encoder_from_directory(tmp_path):
    config = BertConfig(vocab_size=1040, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=32)
    bert = build_text_encoder(config)
    assert isinstance(bert, BertModel) and bert.pooler is not None
    bert.save_pretrained(tmp_path)
    loaded = build_text_encoder(tmp_path)
    for (k, v), (k2, v2) in zip(bert.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        build_text_encoder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_text_encoder(tmp_path / "..")
    with pytest.raises(TypeError, match="BertConfig"):
        build_text_encoder({"hidden_size": 8})


def test_tokenize_captions(tokenizer):
    captions = ["A cat . Red car", "dog ."]
    out = tokenize_captions(tokenizer, captions)
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids", "offset_mapping"}
    ids, am = out["input_ids"], out["attention_mask"]
    assert ids.dtype == am.dtype == torch.int64 and ids.shape == (2, 8)  # padded to the longest
    w = {word: 1030 + i for i, word in enumerate(WORDS)}
    assert ids.tolist() == [[101, w["a"], w["cat"], 1012, w["red"], w["car"], 1012, 102],
                            [101, w["dog"], 1012, 102, 0, 0, 0, 0]]
    assert am.tolist() == [[1] * 8, [1] * 4 + [0] * 4] and out["token_type_ids"].abs().sum() == 0
    # offsets index the preprocessed caption
    text = preprocess_caption(captions[0])
    spans = out["offset_mapping"][0].tolist()
    assert [text[s:e] for s, e in spans] == ["", "a", "cat", ".", "red", "car", ".", ""]
    # truncation after tokenisation: the final [SEP] is lost
    short = tokenize_captions(tokenizer, captions, max_text_len=5)
    assert torch.equal(short["input_ids"], ids[:, :5]) and short["offset_mapping"].shape == (2, 5, 2)
    assert 102 not in short["input_ids"][0].tolist()
    assert tokenize_captions(tokenizer, captions, max_text_len=None)["input_ids"].shape == (2, 8)


def test_tokenize_captions_errors(tokenizer):
    with pytest.raises(ValueError, match=r"captions\[1\] is empty or only whitespace"):
        tokenize_captions(tokenizer, ["cat", "  "])
    with pytest.raises(ValueError, match=r"captions\[0\] is empty"):
        tokenize_captions(tokenizer, [""])
    with pytest.raises(TypeError, match=r"captions\[1\] must be a string"):
        tokenize_captions(tokenizer, ["cat", 3])
    with pytest.raises(TypeError, match="not one string"):
        tokenize_captions(tokenizer, "cat")
    with pytest.raises(ValueError, match="captions is empty"):
        tokenize_captions(tokenizer, [])
    with pytest.raises(ValueError, match="max_text_len"):
        tokenize_captions(tokenizer, ["cat"], max_text_len=0)
