"""The open visual vocabulary: MiniLM sentence vectors, ConSE over the backbone's class evidence, the text routing and the gate."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.errors import InvalidInputError
from engine.models.concepts import ConceptTable, conse_scores
from query.concept_search import concept_gate, content_words, text_models_cover


@pytest.fixture(scope="module")
def encoder():
    from engine.models.minilm import MiniLMEncoder

    return MiniLMEncoder()


def test_minilm_matches_sentence_transformers(encoder) -> None:
    st = pytest.importorskip("sentence_transformers")
    from engine.models.minilm import minilm_dir

    texts = ["a kitten", "a brown horse on the grass", "grandma's old rag doll"]
    reference = st.SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts)
    np.testing.assert_allclose(encoder.encode(texts), reference, atol=1e-5)


def test_minilm_paraphrases_are_close(encoder) -> None:
    kitten, cat, car = encoder.encode(["a kitten", "a cat", "a red car"])
    assert kitten @ cat > kitten @ car + 0.2
    np.testing.assert_allclose(np.linalg.norm(kitten), 1.0, atol=1e-5)


def test_minilm_batches_do_not_change_vectors(encoder) -> None:
    alone = encoder.encode(["a dog"])[0]
    batched = encoder.encode(["a dog", "a very long sentence about many different things in a big garden"])[0]
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def _table(vectors: np.ndarray, ancestors: list[list[int]], ancestor_vectors: np.ndarray) -> ConceptTable:
    offsets = np.cumsum([0] + [len(a) for a in ancestors])
    return ConceptTable(
        names=np.asarray([f"c{i}" for i in range(len(vectors))]),
        name_vectors=vectors,
        gloss_vectors=vectors,
        ancestor_names=np.asarray([f"a{i}" for i in range(len(ancestor_vectors))]),
        ancestor_vectors=ancestor_vectors,
        ancestor_offsets=offsets,
        ancestor_index=np.asarray([i for a in ancestors for i in a], np.int64),
        version="test",
    )


def test_relevance_reaches_classes_through_their_ancestors() -> None:
    eye = np.eye(4, dtype=np.float32)
    table = _table(eye[:3], [[0], [0], []], eye[3:])  # classes 0 and 1 descend from ancestor 0 (axis 3)
    r = table.relevance(eye[3])
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(1.0) and r[2] == pytest.approx(0.0)
    assert table.relevance(eye[1]).argmax() == 1


def test_conse_scores_are_the_probability_weighted_relevance() -> None:
    relevance = np.asarray([1.0, 0.0, 0.5], np.float32)
    evidence = np.asarray([[[0, 2], [0.6, 0.2]], [[1, 2], [0.5, 0.5]]], np.float16)
    np.testing.assert_allclose(conse_scores(evidence, relevance), [(0.6 + 0.1) / 0.8, 0.25], rtol=1e-3)
    with pytest.raises(InvalidInputError):
        conse_scores(np.zeros((2, 3)), relevance)


def test_shipped_table_knows_hypernyms(encoder) -> None:
    table = ConceptTable.load()
    names = [str(n) for n in table.names]
    animal = table.relevance(encoder.encode(["an animal"])[0])
    tiger, cup = names.index("tiger, Panthera tigris"), names.index("espresso")
    assert animal[tiger] > animal[cup] + 0.2
    assert table.relevance(encoder.encode(["a kitten"])[0]).argmax() in [i for i, n in enumerate(names) if " cat" in n or n.startswith("tabby")]


def test_missing_table_is_a_clear_error(tmp_path: Path) -> None:
    from engine.errors import CheckpointError

    with pytest.raises(CheckpointError, match="build_concepts.py"):
        ConceptTable.load(tmp_path / "none.npz")


def test_routing_by_content_words() -> None:
    vocab = {"red", "circle", "left", "blue", "square"}
    assert content_words("the red circle to the left of it") == ["red", "circle", "left"]
    assert text_models_cover("a red circle left of the blue square", vocab)
    assert not text_models_cover("a red tiger", vocab)
    assert not text_models_cover("the", vocab)  # no content word: nothing for the first-wave models to read


def test_gate_maps_the_query_score_to_zero_one() -> None:
    assert concept_gate(0.2, floor=0.3, ceiling=0.6) == 0.0
    assert concept_gate(0.45, floor=0.3, ceiling=0.6) == pytest.approx(0.5)
    assert concept_gate(0.9, floor=0.3, ceiling=0.6) == 1.0
    assert concept_gate(0.5, floor=0.4, ceiling=0.4) == 1.0


@pytest.mark.parametrize("bad", [dict(concept_weight=-1.0), dict(concept_gate=(0.6, 0.3)), dict(concept_gate=(0.1,)), dict(concept_weight=float("nan"))])
def test_config_rejects_bad_concept_settings(bad: dict) -> None:
    with pytest.raises(InvalidInputError):
        EngineConfig(**bad)


def test_region_evidence_names_what_the_region_shows() -> None:
    import skimage.data
    import torch
    from PIL import Image

    from indexer.backbone import create_backbone, preprocess
    from indexer.concept_evidence import ConceptEvidence

    backbone = create_backbone()
    image = Image.fromarray(skimage.data.chelsea())  # a cat, 451 x 300
    batch, _ = preprocess([image], max_size=backbone.max_size)
    with torch.no_grad():
        maps = backbone(batch, levels=["c5"])
    evidence = ConceptEvidence(backbone=backbone)
    [rows] = evidence.evidence(maps, [image.size], [np.asarray([[60, 40, 260, 240], [0, 0, 451, 300]], np.float64)])
    assert rows.shape == (2, 2, 10) and rows.dtype == np.float16
    assert int(rows[0, 0, 0]) in (281, 282, 283, 285, 287)  # tabby, tiger cat, Persian, Egyptian cat, lynx
    assert np.all(np.diff(rows[:, 1].astype(np.float32), axis=1) <= 1e-3)  # probabilities best first
