"""Text-only search with SAN: the shipped SAN (MiniLM word features) as one part of every text-only query
through the open vocabulary, the ``san`` FAISS file, STA scores, clear errors; the first-wave path (a SAN
reading its vocabulary: ``san_text`` stage 1, STA reranking) with a vocabulary SAN."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.api import Engine
from engine.boxes import box_iou
from engine.cli import main
from engine.config import EngineConfig, IndexConfig
from engine.datasets.annotations import read_annotations
from engine.errors import IndexVersionError, InvalidInputError
from engine.synth import SynthConfig, generate_corpus


@pytest.fixture(scope="module")
def corpus320(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("san320") / "corpus"
    generate_corpus(root, SynthConfig(images=30, seed=11, size=320))
    return root


@pytest.fixture(scope="module")
def engine320(corpus320: Path, tmp_path_factory: pytest.TempPathFactory):
    """30 synthetic scenes at the training resolution (320 px), indexed with their GT boxes and SAN."""
    engine = Engine(tmp_path_factory.mktemp("sanidx") / "idx", config=EngineConfig(device="cpu"))
    engine.index(corpus320, config=IndexConfig(proposals="gt"))
    yield engine
    engine.close()


def _found(hits, image: str, box) -> int:  # noqa: ANN001
    """1-based rank of the first hit on ``box`` of ``image`` (IoU > 0.5), else 0."""
    for rank, h in enumerate(hits, start=1):
        if Path(h.image).name == Path(image).name and box_iou([h.box], [box])[0, 0] > 0.5:
            return rank
    return 0


def test_a_described_region_is_found_by_its_description_alone(engine320: Engine, corpus320: Path) -> None:
    """Each image's first region, searched by its description only, is among the top 10 of ~300 regions
    for most images (chance: about 3 %)."""
    anns = read_annotations(corpus320)
    total = engine320.info().regions
    found = 0
    for ann in anns:
        region = ann.regions[0]
        hits = engine320.search(text=region.description, k=10)
        assert len(hits) == 10
        assert all(set(h.scores) == {"concept", "projection", "san", "proposal"} for h in hits)  # the open vocabulary with SAN as a part, and the proposal prior
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        found += _found(hits, ann.image, region.box) > 0
    assert total > 250
    assert found >= 0.5 * len(anns), (found, len(anns))


def test_san_part_is_the_full_sta_score_of_each_candidate(engine320: Engine) -> None:
    store = engine320._open_reader()
    text = "a red circle left of a blue square"
    hits = engine320.search(text=text, k=5)
    rows = store.regions([h.region_id for h in hits])
    vectors = store.read_arrays("san", np.asarray([r.row for r in rows])).astype(np.float32)
    model = engine320.san_encoder.model
    assert model.net.config.word_features == "minilm"
    np.testing.assert_allclose([h.scores["san"] for h in hits], model.score(text, vectors), atol=1e-5)


def test_a_vocabulary_san_keeps_the_first_wave_path(corpus320: Path, tmp_path: Path) -> None:
    """A SAN reading its vocabulary (the ablation rows, `--text-encoder vocab`) serves texts in its words
    alone: SAN's t_g in its FAISS file (stage 1), the full STA score (stage 2)."""
    from engine.models.checkpoint import PACKAGE_CHECKPOINTS

    config = EngineConfig(device="cpu", san_checkpoint=PACKAGE_CHECKPOINTS / "san-fv+it.pt")
    with Engine(tmp_path / "idx", config=config) as engine:
        engine.index(corpus320, config=IndexConfig(proposals="gt"))
        text = "a red circle left of a blue square"
        hits = engine.search(text=text, k=5)
        assert all(set(h.scores) == {"san_text", "san"} and h.score == h.scores["san"] for h in hits)
        store = engine._open_reader()
        rows = store.regions([h.region_id for h in hits])
        vectors = store.read_arrays("san", np.asarray([r.row for r in rows])).astype(np.float32)
        model = engine.san_encoder.model
        np.testing.assert_allclose([h.score for h in hits], model.score(text, vectors), atol=1e-5)
        v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        np.testing.assert_allclose([h.scores["san_text"] for h in hits], v @ model.text_vector(text), atol=2e-3)
        assert set(engine.search(text="zorblax quuxly", k=1)[0].scores) == {"concept", "projection", "proposal"}  # no word it knows: the open vocabulary


def test_cli_text_only_query(engine320: Engine) -> None:
    result = CliRunner().invoke(main, ["query", "--index", str(engine320.index_dir), "--text", "a small green triangle", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["hits"]
    assert len(hits) == 3 and all(len(h["box"]) == 4 and "san" in h["scores"] for h in hits)
    bad = CliRunner().invoke(main, ["query", "--index", str(engine320.index_dir), "--text", "?!"])
    assert bad.exit_code != 0 and len(bad.output.strip().splitlines()) == 1


def test_cli_text_only_query_draws_its_pictures(engine320: Engine, tmp_path: Path) -> None:
    """--save-vis on a text-only query: a text card as query.png, each hit's box drawn on its image."""
    from PIL import Image

    vis = tmp_path / "vis"
    args = ["query", "--index", str(engine320.index_dir), "--text", "a small green triangle", "-k", "2", "--json", "--save-vis", str(vis)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["hits"]
    assert sorted(p.name for p in vis.iterdir()) == ["contact_sheet.png", "hit_01.png", "hit_02.png", "query.png"]
    card = np.asarray(Image.open(vis / "query.png").convert("RGB"))
    assert (card[2, 2] == (40, 220, 60)).all() and (card.max(axis=-1) < 100).sum() > 50  # green frame, dark text
    pic = np.asarray(Image.open(vis / "hit_01.png").convert("RGB")).astype(int)
    x1, y1, x2, y2 = (round(v) for v in hits[0]["box"])
    edge = pic[min(max(y1, 0), pic.shape[0] - 1), max(x1, 0) : min(x2, pic.shape[1])]
    assert (np.abs(edge - (255, 40, 40)).sum(axis=-1) < 30).mean() > 0.8  # the red box on its top edge


def test_wordless_text_is_an_error_and_unknown_words_go_through_the_open_vocabulary(engine320: Engine) -> None:
    with pytest.raises(InvalidInputError):
        engine320.search(text="   ")
    hits = engine320.search(text="zorblax quuxly", k=3)  # no word is unknown: ConSE, the projection and SAN (MiniLM word pieces) answer
    assert len(hits) == 3 and set(hits[0].scores) == {"concept", "projection", "san", "proposal"}
    assert "san" in engine320.search(text="a red circle", k=1)[0].scores


def test_an_index_without_san_answers_text_through_the_open_vocabulary_alone(tiny_corpus: Path, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    engine = Engine(index, config=EngineConfig(device="cpu", san=False))
    engine.index(tiny_corpus, config=IndexConfig(proposals="gt"))
    assert not (index / "vectors-san.faiss").exists()
    assert set(engine.search(text="a red circle", k=1)[0].scores) == {"concept", "projection", "proposal"}
    engine.close()
    # the default engine (SAN on) still updates that index, without SAN, and answers without SAN's part
    with Engine(index, config=EngineConfig(device="cpu")) as again:
        summary = again.index(tiny_corpus, config=IndexConfig(proposals="gt"))
        assert summary.unchanged == 16 and summary.errors == 0
        q = read_annotations(tiny_corpus)[0]
        assert again.search(image=tiny_corpus / q.image, region=q.regions[0].box, text=q.regions[0].description, k=3)
        assert set(again.search(text="a red circle", k=1)[0].scores) == {"concept", "projection", "proposal"}
    result = CliRunner().invoke(main, ["query", "--index", str(index), "--text", "a red circle", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["hits"]


def test_an_index_without_san_or_the_vocabulary_says_to_reindex(tiny_corpus: Path, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    with Engine(index, config=EngineConfig(device="cpu", san=False, concepts=False)) as engine:
        engine.index(tiny_corpus, config=IndexConfig(proposals="gt"))
    with Engine(index, config=EngineConfig(device="cpu")) as again:
        with pytest.raises(IndexVersionError, match="re-index"):
            again.search(text="a red circle")
    result = CliRunner().invoke(main, ["query", "--index", str(index), "--text", "a red circle"])
    assert result.exit_code == 1 and "re-index" in result.output and len(result.output.strip().splitlines()) == 1


def test_san_file_is_rebuilt_when_missing(engine320: Engine, tmp_path: Path) -> None:
    """Like vectors.faiss, the SAN file is derived data: a lost file is rebuilt from the feature store."""
    copy = tmp_path / "idx"
    shutil.copytree(engine320.index_dir, copy)
    (copy / "vectors-san.faiss").unlink()
    with Engine(copy, config=EngineConfig(device="cpu")) as other:
        a = other.search(text="a big blue square", k=5)
    b = engine320.search(text="a big blue square", k=5)
    assert [h.region_id for h in a] == [h.region_id for h in b]


def test_san_candidates_join_the_shortlist_of_a_combined_query(engine320: Engine, corpus320: Path) -> None:
    """With a stage-1 shortlist of 5, the GRN also rescores the text's top SAN matches."""
    from dataclasses import replace

    from query.encode import VisualQueryEncoder, load_query_region

    ann = read_annotations(corpus320)[3]
    region = ann.regions[0]
    small = Engine(engine320.index_dir, config=replace(engine320.config, shortlist=5, san_candidates=20, stage3=False))  # stage 2 only
    try:
        hits = small.search(image=corpus320 / ann.image, region=region.box, text=region.description, k=25)
        store = small._open_reader()
        vector = VisualQueryEncoder(small.extractor).encode(load_query_region(corpus320 / ann.image, region.box)).vector
        _, visual_ids = store.search(vector[None], 5)
        _, san_ids = store.search(small.san_encoder.model.text_vector(region.description)[None], 20, array="san")
        got = {h.region_id for h in hits}
        assert got - set(visual_ids[0].tolist())  # more than the visual shortlist was rescored
        assert got <= set(visual_ids[0].tolist()) | set(san_ids[0].tolist())
        assert all(set(h.scores) == {"visual", "grn", "san"} for h in hits)
        assert all(h.score == pytest.approx(h.scores["grn"] + small.config.text_weight * h.scores["san"], abs=1e-5) for h in hits)
        off = replace(small.config, san_candidates=0)
        with Engine(engine320.index_dir, config=off) as none:
            only = none.search(image=corpus320 / ann.image, region=region.box, text=region.description, k=25)
        assert {h.region_id for h in only} <= set(visual_ids[0].tolist())
    finally:
        small.close()
