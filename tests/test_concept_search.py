"""Search through the open vocabulary on real photographs: any English text is understood, and a text
unrelated to the query region does not sink its visual match."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from engine.api import Engine
from engine.config import EngineConfig
from query.concept_search import ConceptRescorer
from query.request import SearchRequest
from query.rerank import StageScores


@pytest.fixture(scope="module")
def photo_engine(tmp_path_factory: pytest.TempPathFactory):
    import skimage.data

    corpus = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).save(corpus / f"{name}.jpg", quality=92)
    ImageOps.mirror(Image.fromarray(skimage.data.chelsea())).save(corpus / "chelsea_mirrored.jpg", quality=92)
    engine = Engine(tmp_path_factory.mktemp("photo-index"))
    engine.index(corpus)
    yield engine, corpus
    engine.close()


def _names(hits) -> list[str]:
    return [Path(h.image).name for h in hits]


def test_index_stores_class_evidence(photo_engine) -> None:
    engine, _ = photo_engine
    store = engine.pipeline.store
    assert store.has_array("concepts")
    assert "concepts" in store.models()
    rows = store.all_regions().rows[:5]
    evidence = store.read_arrays("concepts", rows).astype(np.float32)
    assert evidence.shape == (5, 2, 10)
    assert np.all((evidence[:, 0] >= 0) & (evidence[:, 0] < 1000)) and np.all(evidence[:, 1] <= 1.0)


def test_text_only_understands_any_english(photo_engine) -> None:
    engine, _ = photo_engine
    hits = engine.search(text="a kitten", k=3)
    assert _names(hits)[0].startswith("chelsea")
    assert set(hits[0].scores) == {"concept", "projection", "san", "proposal"}  # ConSE, the text projection's cosine, the shipped SAN (MiniLM), log proposal score
    weight, prior = engine.config.projection_weight, engine.config.proposal_weight
    assert all(h.scores["proposal"] <= 0 for h in hits)  # the log of a score in (0, 1]
    rest = [(h.score - h.scores["concept"] - weight * h.scores["projection"] - prior * h.scores["proposal"]) / (engine.config.san_weight * h.scores["san"]) for h in hits if abs(h.scores["san"]) > 1e-3]
    assert rest and all(0 - 1e-4 <= g <= 1 + 1e-4 and g == pytest.approx(rest[0], abs=1e-3) for g in rest)  # one confidence gate per query
    assert _names(engine.search(text="a cup of espresso", k=1)) == ["coffee.jpg"]
    assert len(engine.search(text="grandma's old rag doll", k=3)) == 3  # no word is out of vocabulary


def test_combined_query_keeps_its_visual_match_under_an_unrelated_text(photo_engine) -> None:
    engine, corpus = photo_engine
    region = (60, 30, 280, 260)
    own = engine.search(image=corpus / "chelsea.jpg", region=region, text="a cat", k=3, exclude_self=True)
    other = engine.search(image=corpus / "chelsea.jpg", region=region, text="a rocket on its launch pad", k=3, exclude_self=True)
    alone = engine.search(image=corpus / "chelsea.jpg", region=region, k=3, exclude_self=True)
    assert _names(own)[0] == _names(other)[0] == _names(alone)[0] == "chelsea_mirrored.jpg"
    assert {"visual", "layout", "concept"} <= set(own[0].scores)
    assert own[0].score > alone[0].score  # the fitting text adds to the match


def test_batch_and_single_combined_queries_agree(photo_engine) -> None:
    engine, corpus = photo_engine
    request = SearchRequest(image=corpus / "chelsea.jpg", region=(60, 30, 280, 260), text="a tabby cat", k=3, exclude_self=True)
    [batched] = engine.search_batch([request])
    single = engine.search(image=request.image, region=request.region, text=request.text, k=3, exclude_self=True)
    assert [(h.region_id, round(h.score, 5)) for h in batched] == [(h.region_id, round(h.score, 5)) for h in single]


def test_region_id_query_reads_the_stored_evidence(photo_engine) -> None:
    engine, corpus = photo_engine
    [first] = engine.search(image=corpus / "chelsea.jpg", region=(60, 30, 280, 260), k=1, exclude_self=True)
    hits = engine.search(region_id=first.region_id, text="a cat", k=2)
    assert "concept" in hits[0].scores


def test_index_without_the_vocabulary_keeps_the_first_wave_text_path(tmp_path: Path) -> None:
    import skimage.data

    corpus = tmp_path / "c"
    corpus.mkdir()
    Image.fromarray(skimage.data.coffee()).save(corpus / "coffee.jpg")
    with Engine(tmp_path / "idx", config=EngineConfig(concepts=False)) as engine:
        engine.index(corpus)
        assert not engine.pipeline.store.has_array("concepts")
        assert not engine.pipeline.uses_concepts()


def test_shapes_words_on_a_photo_go_through_the_open_vocabulary(photo_engine) -> None:
    engine, corpus = photo_engine
    pipe = engine.pipeline
    request = SearchRequest(image=corpus / "chelsea.jpg", region=(60, 30, 280, 260), text="a big white circle", k=3, exclude_self=True)
    assert not pipe.through_concepts("a big white circle", combined=True)  # every word is in the shapes vocabulary ...
    query = pipe.encode(request, san=True)  # the SAN vector comes from the same backbone pass
    assert query.san_vector is not None and query.concepts is not None
    assert not pipe.san_relates(request, query, "a big white circle")  # ... but SAN cannot read it in a photograph of a cat
    hits = engine.search(image=request.image, region=request.region, text=request.text, k=3, exclude_self=True)
    assert _names(hits)[0] == "chelsea_mirrored.jpg" and "concept" in hits[0].scores and "grounding" not in hits[0].scores


def test_san_gate_below_every_score_keeps_the_first_wave_path(photo_engine, tmp_path: Path) -> None:
    from dataclasses import replace

    engine, corpus = photo_engine
    with Engine(engine.index_dir, config=replace(engine.config, san_gate=-1.0)) as ungated:
        request = SearchRequest(image=corpus / "chelsea.jpg", region=(60, 30, 280, 260), text="a big white circle", k=3)
        assert ungated.pipeline.san_relates(request, ungated.pipeline.encode(request), "a big white circle")


def test_a_synonym_finds_what_the_word_finds(photo_engine) -> None:
    engine, _ = photo_engine
    for word, synonym in (("a cat", "a kitten"), ("a cup of coffee", "an espresso"), ("a rocket", "a spacecraft launcher")):
        first = [n.replace("_mirrored", "") for n in _names(engine.search(text=word, k=1)) + _names(engine.search(text=synonym, k=1))]
        assert first[0] == first[1], (word, synonym, first)  # the same photograph (or its mirrored copy)


def test_projection_weight_zero_ranks_by_the_vocabulary_alone(photo_engine) -> None:
    from dataclasses import replace

    engine, _ = photo_engine
    with Engine(engine.index_dir, config=replace(engine.config, projection_weight=0.0, san_weight=0.0, proposal_weight=0.0)) as plain:
        hits = plain.search(text="a kitten", k=3)
        assert set(hits[0].scores) == {"concept"} and hits[0].score == pytest.approx(hits[0].scores["concept"])
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def _projection_onto(engine: Engine, text: str, key: np.ndarray, path: Path, key_version: str | None = None) -> Path:
    """A text projection that maps ``text`` exactly onto ``key`` (rank one: W = key sᵀ)."""
    import torch

    from engine.models.checkpoint import Manifest
    from engine.models.text_projection import ProjectionConfig, TextProjection

    sentence = engine.concept_vocabulary.text_vector(text)
    version = key_version or f"{engine.config.backbone.name}:{engine.config.features.key_version}"
    model = TextProjection(ProjectionConfig(key_version=version, text_encoder="all-MiniLM-L6-v2", text_dim=len(sentence), key_dim=len(key)))
    with torch.no_grad():
        model.linear.weight.copy_(torch.from_numpy(np.outer(key, sentence)))
        model.linear.bias.zero_()
    model.save(path, Manifest(model="text-projection", version="1", config={}, command="test", data="", seed=0, metrics={}))
    return path


def test_text_only_search_finds_the_region_its_projection_points_at(photo_engine, tmp_path: Path) -> None:
    from dataclasses import replace

    engine, _ = photo_engine
    store = engine.pipeline.store
    regions = store.all_regions()
    rocket = next(i for i, image in enumerate(regions.image_ids) if Path(store.regions([int(regions.ids[i])])[0].image_path).name == "rocket.jpg")
    key = store.read_arrays("visual", regions.rows[rocket : rocket + 1])[0].astype(np.float32)
    path = _projection_onto(engine, "grandma's old rag doll", key / np.linalg.norm(key), tmp_path / "tp.pt")
    with Engine(engine.index_dir, config=replace(engine.config, text_projection=path, projection_weight=50.0)) as pointed:
        [hit] = pointed.search(text="grandma's old rag doll", k=1)
        assert hit.region_id == int(regions.ids[rocket]) and hit.scores["projection"] == pytest.approx(1.0, abs=1e-3)


def test_a_projection_for_another_visual_key_is_a_clear_error(photo_engine, tmp_path: Path) -> None:
    from dataclasses import replace

    from engine.errors import CheckpointError

    engine, _ = photo_engine
    path = _projection_onto(engine, "a cat", np.ones(engine.extractor.dim, np.float32) / np.sqrt(engine.extractor.dim), tmp_path / "other.pt", key_version="resnet50:c5:mean")
    with Engine(engine.index_dir, config=replace(engine.config, text_projection=path)) as wrong:
        with pytest.raises(CheckpointError, match="trained for visual key 'resnet50:c5:mean'"):
            wrong.search(text="a cat", k=1)
    with Engine(engine.index_dir, config=replace(engine.config, text_projection=None, san_weight=0.0)) as off:
        assert set(off.search(text="a cat", k=1)[0].scores) == {"concept"}


def test_explain_reads_the_text_as_the_search_did(photo_engine, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from engine.cli import main

    engine, _ = photo_engine
    out = tmp_path / "explain"
    result = CliRunner().invoke(main, ["query", "--index", str(engine.index_dir), "--text", "a kitten", "-k", "2", "--explain", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["explain_01.png", "explain_02.png"]
    grounder = engine.vocabulary_grounder()  # what the CLI used: the hits came through the vocabulary
    hit = engine.search(text="a kitten", k=1)[0]
    [grounding] = grounder.ground(Image.open(hit.image), ["a kitten"])
    assert grounding.method == "vocabulary" and Path(hit.image).name.startswith("chelsea")


def test_query_cli_weights_of_the_open_vocabulary(photo_engine) -> None:
    import json

    from click.testing import CliRunner

    from engine.cli import main

    engine, corpus = photo_engine
    index = ["query", "--index", str(engine.index_dir), "--json"]
    plain = CliRunner().invoke(main, [*index, "--text", "a kitten", "-k", "2", "--weight-projection", "0", "--weight-san", "0"])
    assert plain.exit_code == 0, plain.output
    assert all(set(h["scores"]) == {"concept"} for h in json.loads(plain.output)["hits"])
    region = ["--image", str(corpus / "chelsea.jpg"), "--region", "60,30,280,260", "--exclude-self", "-k", "1"]
    unweighted = CliRunner().invoke(main, [*index, *region, "--text", "a cat", "--weight-concept", "0"])
    alone = engine.search(image=corpus / "chelsea.jpg", region=(60, 30, 280, 260), k=1, exclude_self=True)
    assert json.loads(unweighted.output)["hits"][0]["score"] == pytest.approx(alone[0].score, abs=1e-5)  # the text weighs nothing
    misplaced = CliRunner().invoke(main, [*index, *region, "--text", "a cat", "--weight-projection", "1"])
    assert misplaced.exit_code != 0 and "--weight-projection weighs the text projection in a text-only query" in misplaced.output
    misplaced = CliRunner().invoke(main, [*index, *region, "--text", "a cat", "--weight-san", "1"])
    assert misplaced.exit_code != 0 and "--weight-san weighs SAN in a text-only query" in misplaced.output


def test_a_san_reading_minilm_joins_every_text_only_query(tiny_corpus: Path, tmp_path: Path) -> None:
    import skimage.data
    from dataclasses import replace

    from engine.training.options import TrainOptions
    from engine.training.san import SANTrainConfig, train_san

    san = tmp_path / "san.pt"
    options = TrainOptions(data=tiny_corpus, out=san, epochs=1, progress=False, cache_dir=tmp_path / "cache")
    train_san("san", options, train_config=SANTrainConfig(batch_size=16, warmup_epochs=0), model_overrides={"embed_dim": 16, "word_dim": 16, "attn_dim": 8})
    corpus = tmp_path / "photos"
    corpus.mkdir()
    for name in ("chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).save(corpus / f"{name}.jpg", quality=92)
    config = EngineConfig(san_checkpoint=san, san_weight=2.0, san_text_gate=(-1.0, -1.0))  # SAN's full weight whatever its confidence
    with Engine(tmp_path / "index", config=config) as engine:
        engine.index(corpus)
        for text in ("a kitten", "a red circle"):  # shapes words too: SAN reads every word, so it is one part of every text-only query
            hits = engine.search(text=text, k=3)
            assert len(hits) == 3 and set(hits[0].scores) == {"concept", "projection", "san", "proposal"}
            for h in hits:
                expected = h.scores["concept"] + config.projection_weight * h.scores["projection"] + 2.0 * h.scores["san"] + config.proposal_weight * h.scores["proposal"]
                assert h.score == pytest.approx(expected, abs=1e-4)
        store = engine.pipeline.store
        assert store.read_arrays("san", store.all_regions().rows[:2]).shape == (2, 16)  # this SAN's vectors were indexed
    with Engine(tmp_path / "index", config=replace(config, san_text_gate=(1.5, 2.0))) as doubtful:  # SAN's best match is never that confident
        for h in doubtful.search(text="a kitten", k=3):
            assert "san" in h.scores and h.score == pytest.approx(h.scores["concept"] + config.projection_weight * h.scores["projection"] + config.proposal_weight * h.scores["proposal"], abs=1e-4)
    with pytest.raises(Exception, match="san_text_gate"):
        replace(config, san_text_gate=(0.7, 0.5))
    with Engine(tmp_path / "index", config=replace(config, san_weight=0.0)) as plain:
        assert set(plain.search(text="a kitten", k=1)[0].scores) == {"concept", "projection", "proposal"}
    with Engine(tmp_path / "index", config=replace(config, combined_san_weight=1.0)) as combined:
        hits = combined.search(image=corpus / "chelsea.jpg", text="a kitten", k=3)
        assert all("san" in h.scores and "concept" in h.scores for h in hits)
        store = combined.pipeline.store
        rows = store.all_regions().rows[:4]
        relevance = combined.pipeline.models.concept_vocabulary.relevance("a kitten")
        base = lambda r: StageScores(final=np.full(len(r), 0.25, np.float32))  # noqa: E731
        san = lambda r: StageScores(final=np.full(len(r), 0.5, np.float32))  # noqa: E731
        scored = ConceptRescorer(store=store, base=base, vector=np.zeros(1, np.float32), relevance=relevance, weight=0.2, gate=0.5, san=san, san_weight=2.0)(rows)
        np.testing.assert_allclose(scored.final, 0.25 + 0.5 * (0.2 * scored.concept + 2.0 * 0.5), atol=1e-6)  # base + gate · (w · concept + w_s · san)
        assert np.all(scored.san == 0.5)


def test_the_proposal_prior_is_the_log_of_each_regions_stored_score_within_its_image(photo_engine) -> None:
    """Text-only queries add ``proposal_weight ·`` the log of each hit's stored proposal score relative to its image's
    best candidate; weight 0 leaves it out."""
    from dataclasses import replace

    from query.concept_search import proposal_prior

    engine, _ = photo_engine
    store = engine.pipeline.store
    regions = store.all_regions()
    some = regions.take(np.arange(0, len(regions), max(1, len(regions) // 7)))
    by_id = {row.id: row.objectness for row in store.regions(some.ids.tolist())}
    logs = np.log(np.maximum([by_id[int(i)] for i in some.ids], 1e-4))
    assert len(set(np.round(logs, 4))) > 1  # the shipped RPN's scores differ from box to box
    best = {img: max(v for j, v in zip(some.image_ids, logs) if j == img) for img in set(some.image_ids.tolist())}
    expected = logs - np.array([best[int(j)] for j in some.image_ids])
    np.testing.assert_allclose(proposal_prior(some), expected, rtol=1e-5, atol=1e-6)  # relative to the image's best
    hits = engine.search(text="a kitten", k=5)
    assert hits and all(h.scores["proposal"] <= 1e-6 for h in hits)
    with Engine(engine.index_dir, config=replace(engine.config, proposal_weight=0.0)) as without:
        assert all("proposal" not in h.scores for h in without.search(text="a kitten", k=5))
