"""Vocabulary and the two sentence encoders of the GRN paper (self-attention pooling, LSTM), on word ids
(``word_features="vocab"``) and on MiniLM word features (``minilm``)."""
from __future__ import annotations

import pytest
import torch

from engine.errors import CheckpointError, InvalidInputError
from engine.models.text_encoders import LSTMEncoder, SelfAttentionEncoder, create_text_encoder, pad_words, require_words, word_count, word_tensors
from engine.models.vocab import PAD, UNK, Vocabulary, tokenize
from engine.models.word_features import MINILM_DIM, MiniLMAdapter

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
    enc = create_text_encoder(kind, vocab_size=len(vocab), dim=16, word_features="vocab").eval()
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
    enc = SelfAttentionEncoder(vocab_size=len(vocab), dim=8, word_features="vocab")
    ids, lengths = vocab.encode_batch(TEXTS)
    weights = enc.word_weights(ids, lengths)
    assert torch.allclose(weights.sum(1), torch.ones(len(TEXTS)))
    assert (weights[3, lengths[3]:] == 0).all()
    expected = torch.einsum("bt,btd->bd", weights, enc.embedding(ids))
    torch.testing.assert_close(enc(ids, lengths), expected)


def test_lstm_prefix_is_read_first() -> None:
    torch.manual_seed(0)
    enc = LSTMEncoder(vocab_size=10, word_dim=4, dim=6, word_features="vocab")
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


# --------------------------------------------------------------------------- MiniLM word features


def _features(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random word features ``[B, max L, 384]`` zero-padded after each row's length, and the lengths ``[B]``."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(lengths), max(lengths), MINILM_DIM)
    for i, n in enumerate(lengths):
        out[i, :n] = torch.randn(n, MINILM_DIM, generator=gen)
    return out, torch.tensor(lengths)


@pytest.mark.parametrize("kind", ["attention", "lstm"])
def test_minilm_encoder_reads_features_and_padding_never_changes_the_result(kind: str) -> None:
    torch.manual_seed(0)
    enc = create_text_encoder(kind, vocab_size=1, dim=16).eval()  # minilm is the default
    assert isinstance(enc.embedding, MiniLMAdapter)
    feats, lengths = _features([5, 2, 7])
    out = enc(feats, lengths)
    assert out.shape == (3, 16)
    alone = enc(feats[1:2, :2], lengths[1:2])  # the same sentence without padding
    torch.testing.assert_close(out[1], alone[0], atol=1e-6, rtol=1e-5)
    padded = torch.cat([feats, torch.zeros(3, 4, MINILM_DIM)], dim=1)
    torch.testing.assert_close(enc(padded, lengths), out, atol=1e-6, rtol=1e-5)
    noisy = feats.clone()
    noisy[1, 2:] = 5.0  # garbage in the padding positions is ignored
    torch.testing.assert_close(enc(noisy, lengths)[1], out[1], atol=1e-6, rtol=1e-5)


def test_minilm_self_attention_weights_skip_padding() -> None:
    torch.manual_seed(0)
    enc = SelfAttentionEncoder(vocab_size=1, dim=8)
    feats, lengths = _features([4, 2])
    weights = enc.word_weights(feats, lengths)
    assert weights.shape == (2, 4) and (weights[1, 2:] == 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    torch.testing.assert_close(enc(feats, lengths), torch.einsum("bt,btd->bd", weights, enc.embedding(feats)))


def test_minilm_lstm_prefix_is_read_first() -> None:
    torch.manual_seed(0)
    enc = LSTMEncoder(vocab_size=1, word_dim=4, dim=6)
    feats, lengths = _features([3])
    a, b = enc(feats, lengths, prefix=torch.zeros(1, 4)), enc(feats, lengths, prefix=torch.ones(1, 4))
    assert a.shape == (1, 6) and not torch.allclose(a, b)


def test_a_minilm_encoder_given_word_ids_is_a_clear_error() -> None:
    enc = SelfAttentionEncoder(vocab_size=1, dim=8)
    with pytest.raises(InvalidInputError, match="was the model given word ids"):
        enc(torch.tensor([[2, 3]]), torch.tensor([2]))


def test_word_count_reads_ids_and_features() -> None:
    assert word_count(torch.tensor([[2, 3, 0], [4, 0, 0]])).tolist() == [2, 1]
    feats, _ = _features([3, 1])
    assert word_count(feats).tolist() == [3, 1]


def test_word_tensors_and_pad_words_match_encode_batch_for_a_vocabulary() -> None:
    vocab = Vocabulary.build(TEXTS)
    ids, lengths = pad_words(word_tensors(vocab, TEXTS))
    want_ids, want_lengths = vocab.encode_batch(TEXTS)
    assert ids.dtype == torch.long and torch.equal(ids, want_ids) and torch.equal(lengths, want_lengths)


@pytest.mark.parametrize("text", [None, "", "   ", "?!", "... ,,,"])
def test_require_words_refuses_texts_without_a_word(text: str | None) -> None:
    with pytest.raises(InvalidInputError, match="holds no words"):
        require_words(text)


def test_require_words_keeps_texts_with_a_word() -> None:
    assert require_words("a red circle!") == "a red circle!" and require_words("un chat noir") == "un chat noir"


def test_real_minilm_features_encode_every_word_and_pad_consistently() -> None:
    """The frozen encoder's own features (the installed all-MiniLM-L6-v2): any English word is read, and a
    sentence encodes the same alone or padded in a batch."""
    from engine.models.word_features import MiniLMWords

    words = MiniLMWords()
    texts = ["a sleeping kitten", "a red circle left of a blue square"]
    feats, lengths = words.encode_batch(texts)
    assert feats.shape == (2, int(lengths.max()), MINILM_DIM) and feats.dtype == torch.float32
    again, again_lengths = pad_words(word_tensors(words, texts))
    torch.testing.assert_close(again, feats)
    assert torch.equal(again_lengths, lengths)
    torch.manual_seed(0)
    enc = SelfAttentionEncoder(vocab_size=len(words), dim=16).eval()
    both = enc(feats, lengths)
    alone = enc(*words.encode_batch([texts[0]]))
    torch.testing.assert_close(both[0], alone[0], atol=1e-6, rtol=1e-5)
    with pytest.raises(InvalidInputError, match="holds no words"):
        word_tensors(words, ["?!"])
