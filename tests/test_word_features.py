"""engine.models.word_features: MiniLM word-piece features or a vocabulary as a text model's input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.errors import CheckpointError, InvalidInputError
from engine.models.vocab import Vocabulary
from engine.models.word_features import MiniLMAdapter, MiniLMWords, build_words, erase_words, word_embedding, words_from_payload, words_payload


@pytest.fixture(scope="module")
def words() -> MiniLMWords:
    return MiniLMWords(cache_size=4)


def test_minilm_words_are_word_pieces_without_cls_and_sep(words: MiniLMWords) -> None:
    feats, lengths = words.encode_batch(["a cat", "a kitten sleeping on grandma's old rag doll"])
    assert feats.dtype == torch.float32 and feats.shape[0] == 2 and feats.shape[2] == 384
    pieces = words.encoder.tokenizer.encode("a cat").ids
    assert int(lengths[0]) == len(pieces) - 2  # [CLS] and [SEP] left out
    assert torch.all(feats[0, int(lengths[0]) :] == 0)  # right-padded with zeros
    assert "capybara" in words and words.unknown_words("a capybara") == []


def test_minilm_features_are_cached_and_bounded(words: MiniLMWords) -> None:
    a = words.features(["a red ball"])[0]
    entry = words._cache["a red ball"]
    assert torch.equal(words.features(["a red ball"])[0], a) and words._cache["a red ball"] is entry  # cached: computed once
    words.features([f"text {i}" for i in range(10)])
    assert len(words._cache) <= 10


def test_paraphrases_get_near_features(words: MiniLMWords) -> None:
    def mean(text: str) -> torch.Tensor:
        return torch.nn.functional.normalize(words.features([text])[0].mean(0), dim=0)

    assert float(mean("a kitten") @ mean("a cat")) > float(mean("a kitten") @ mean("a truck"))


def test_empty_texts_are_clear_errors(words: MiniLMWords) -> None:
    for bad in ("", "   "):
        with pytest.raises(InvalidInputError, match="empty"):
            words.encode_batch([bad])
    with pytest.raises(InvalidInputError, match="no texts"):
        words.encode_batch([])
    with pytest.raises(InvalidInputError, match="no words"):
        words.encode_batch(["\ud800"])  # nothing the tokenizer can read
    with pytest.raises(InvalidInputError, match="no words"):
        words.encode_batch(["?!"])


def test_embedding_layers_and_payloads() -> None:
    assert isinstance(word_embedding("vocab", vocab_size=5, dim=3), torch.nn.Embedding)
    adapter = word_embedding("minilm", vocab_size=1, dim=3)
    assert isinstance(adapter, MiniLMAdapter) and adapter(torch.zeros(2, 4, 384)).shape == (2, 4, 3)
    with pytest.raises(InvalidInputError, match="word ids"):
        adapter(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="not known"):
        word_embedding("glove", vocab_size=1, dim=3)
    vocab = build_words("vocab", ["a red circle", "a red square"], min_count=2)
    assert isinstance(vocab, Vocabulary) and words_from_payload(words_payload(vocab)) == vocab
    assert words_from_payload(vocab.to_dict()) == vocab
    minilm = build_words("minilm", ["anything"])
    assert isinstance(minilm, MiniLMWords) and minilm.cache_size is None
    assert isinstance(words_from_payload(words_payload(minilm)), MiniLMWords)
    with pytest.raises(CheckpointError, match="retrain"):
        words_from_payload({"kind": "minilm", "version": "another-model"})
    with pytest.raises(CheckpointError, match="malformed"):
        words_from_payload(42)


def test_erase_words_on_ids_and_features() -> None:
    ids = torch.tensor([[3, 4, 5], [6, 7, 0]])
    out = erase_words(ids, torch.tensor([0, 1]), torch.tensor([1, 0]), unk=1)
    assert out.tolist() == [[3, 1, 5], [1, 7, 0]] and ids[0, 1] == 4
    feats = torch.ones(2, 3, 4)
    out = erase_words(feats, torch.tensor([1]), torch.tensor([2]), unk=1)
    assert torch.all(out[1, 2] == 0) and out.sum() == feats.sum() - 4


def test_train_options_and_cli_name_the_text_encoder(tmp_path) -> None:
    from engine.cli import main
    from engine.training.options import TrainOptions

    with pytest.raises(InvalidInputError, match="not known"):
        TrainOptions(data=tmp_path, text_encoder="glove")
    result = CliRunner().invoke(main, ["train", "san", "--data", str(tmp_path), "--text-encoder", "glove"])
    assert result.exit_code == 2 and "glove" in result.output


def test_text_encoder_is_refused_for_models_without_words(tmp_path) -> None:
    from engine.training.options import TrainOptions
    from engine.training.registry import train_model

    for name in ("rpn", "saliency", "key-whitening", "text-projection", "visual"):
        with pytest.raises(InvalidInputError, match="reads no words"):
            train_model(name, TrainOptions(data=tmp_path, text_encoder="vocab"))


def test_sentence_vectors_come_from_the_same_cached_pass(words: MiniLMWords) -> None:
    from engine.models.minilm import MiniLMEncoder

    texts = ["a kitten on a sofa", "grandma's old rag doll"]
    reference = MiniLMEncoder().encode(texts)  # sentence-transformers' head, batched
    np.testing.assert_allclose(words.encode(texts), reference, atol=1e-5)
    cached = words._cache[texts[0]]
    assert words.features([texts[0]])[0].shape[0] == cached.shape[0] - 2  # the word features are its inner tokens


def test_an_engine_loads_minilm_once_for_the_vocabulary_and_san(tmp_path) -> None:
    from engine.api import Engine

    with Engine(tmp_path / "idx") as engine:
        assert engine.concept_vocabulary.encoder is engine.minilm_words
        assert engine.san_encoder.model.vocab is engine.minilm_words
