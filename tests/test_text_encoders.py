"""Vocabulary and the two sentence encoders of the GRN paper (self-attention pooling, LSTM)."""
from __future__ import annotations

import pytest
import torch

from engine.errors import CheckpointError, InvalidInputError
from engine.models.text_encoders import LSTMEncoder, SelfAttentionEncoder, create_text_encoder
from engine.models.vocab import PAD, UNK, Vocabulary, tokenize

TEXTS = ["a red circle left of a blue square", "a blue square above a red star", "two green stars next to each other", "a red circle"]


def test_tokenize_lowercases_and_splits_punctuation() -> None:
    assert tokenize("A big, polka-dot Star!") == ["a", "big", "polka", "dot", "star"]
    assert tokenize("  ...  ") == []


def test_vocabulary_keeps_words_seen_more_than_once() -> None:
    vocab = Vocabulary.build(TEXTS)
    assert vocab.itos[:2] == [PAD, UNK]
    assert vocab.pad_index == 0 and vocab.unk_index == 1
    for word in ("a", "red", "circle", "blue", "square"):
        assert word in vocab
    for once in ("left", "above", "two", "green", "each"):  # seen once: <unk>
        assert once not in vocab
    assert vocab.itos[2] == "a"  # the most frequent word first
    assert Vocabulary.build(TEXTS, min_count=1).stoi.keys() >= {"left", "green"}


def test_unknown_words_become_unk_and_never_crash() -> None:
    vocab = Vocabulary.build(TEXTS)
    ids = vocab.encode("a purple hexagon left of a red circle")
    assert ids[1] == vocab.unk_index and ids[2] == vocab.unk_index
    assert vocab.unknown_words("a purple hexagon") == ["purple", "hexagon"]
    assert vocab.encode("zzz qqq") == [vocab.unk_index, vocab.unk_index]


@pytest.mark.parametrize("text", ["", "   ", "!!! ,,,"])
def test_text_without_words_is_a_clear_error(text: str) -> None:
    vocab = Vocabulary.build(TEXTS)
    with pytest.raises(InvalidInputError, match="holds no words"):
        vocab.encode(text)


def test_vocabulary_roundtrip_and_batch_padding() -> None:
    vocab = Vocabulary.build(TEXTS)
    again = Vocabulary.from_dict(vocab.to_dict())
    assert again == vocab and again.encode(TEXTS[0]) == vocab.encode(TEXTS[0])
    ids, lengths = vocab.encode_batch(["a red circle", "a blue square above a red circle"])
    assert ids.shape == (2, 7) and lengths.tolist() == [3, 7]
    assert (ids[0, 3:] == vocab.pad_index).all()
    with pytest.raises(CheckpointError):
        Vocabulary.from_dict({"itos": ["x", "y"]})


@pytest.mark.parametrize("kind", ["attention", "lstm"])
def test_encoder_shapes_and_padding_never_changes_the_result(kind: str) -> None:
    torch.manual_seed(0)
    vocab = Vocabulary.build(TEXTS)
    enc = create_text_encoder(kind, vocab_size=len(vocab), dim=16).eval()
    ids, lengths = vocab.encode_batch(TEXTS)
    out = enc(ids, lengths)
    assert out.shape == (len(TEXTS), 16) and enc.out_dim == 16
    # the same sentence alone (no padding) and with extra padding columns gives the same vector
    alone = enc(*vocab.encode_batch([TEXTS[3]]))
    padded = enc(torch.cat([ids, torch.zeros(len(TEXTS), 5, dtype=torch.long)], dim=1), lengths)
    torch.testing.assert_close(out[3], alone[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, padded, atol=1e-6, rtol=1e-5)
    # even garbage token ids in the padding positions are ignored
    noisy = ids.clone()
    noisy[3, lengths[3]:] = 2
    torch.testing.assert_close(enc(noisy, lengths)[3], out[3], atol=1e-6, rtol=1e-5)


def test_self_attention_is_a_weighted_sum_of_word_embeddings() -> None:
    torch.manual_seed(0)
    vocab = Vocabulary.build(TEXTS)
    enc = SelfAttentionEncoder(vocab_size=len(vocab), dim=8)
    ids, lengths = vocab.encode_batch(TEXTS)
    weights = enc.word_weights(ids, lengths)
    assert torch.allclose(weights.sum(1), torch.ones(len(TEXTS)))
    assert (weights[3, lengths[3]:] == 0).all()
    expected = torch.einsum("bt,btd->bd", weights, enc.embedding(ids))
    torch.testing.assert_close(enc(ids, lengths), expected)


def test_lstm_prefix_is_read_first() -> None:
    torch.manual_seed(0)
    enc = LSTMEncoder(vocab_size=10, word_dim=4, dim=6)
    ids = torch.tensor([[2, 3, 4]])
    lengths = torch.tensor([3])
    a = enc(ids, lengths, prefix=torch.zeros(1, 4))
    b = enc(ids, lengths, prefix=torch.ones(1, 4))
    assert a.shape == (1, 6) and not torch.allclose(a, b)
    with pytest.raises(InvalidInputError):
        enc(ids, lengths, prefix=torch.zeros(1, 5))


def test_unknown_encoder_kind_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="attention, lstm"):
        create_text_encoder("gru", vocab_size=10)
