"""The feature cache (on disk, or in memory for one image) gives exactly the region features that indexing computes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.datasets.annotations import read_annotations
from indexer.backbone import BackboneConfig, create_backbone
from indexer.feature_cache import FeatureCache, ImageMaps
from indexer.images import load_image
from indexer.region_features import RegionFeatureExtractor


@pytest.fixture(scope="module")
def extractor() -> RegionFeatureExtractor:
    return RegionFeatureExtractor(backbone=create_backbone(BackboneConfig(), device="cpu"))


def test_cached_region_maps_equal_indexing_features(tiny_corpus: Path, tmp_path: Path, extractor: RegionFeatureExtractor) -> None:
    anns = read_annotations(tiny_corpus)[:3]
    cache = FeatureCache(tiny_corpus, extractor, cache_dir=tmp_path / "cache")
    cache.build(anns, progress=False)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3
    for ann in anns:
        boxes = np.asarray([r.box for r in ann.regions], np.float32)
        [(maps, _)] = extractor([load_image(tiny_corpus / ann.image)], [boxes])
        cached = cache.region_maps(ann.image, boxes)
        assert cached.shape == maps.shape
        np.testing.assert_allclose(cached, maps.astype(np.float32), atol=2e-2, rtol=1e-2)  # float16 storage


def test_get_computes_missing_entries_and_reads_them_back(tiny_corpus: Path, tmp_path: Path, extractor: RegionFeatureExtractor) -> None:
    ann = read_annotations(tiny_corpus)[0]
    cache = FeatureCache(tiny_corpus, extractor, cache_dir=tmp_path / "c")
    first = cache.get(ann.image)
    again = cache.get(ann.image)
    assert first.size == (ann.width, ann.height)
    for lvl in ("c3", "c4", "c5"):
        np.testing.assert_array_equal(first.maps[lvl], again.maps[lvl])
    assert first.maps["c4"].shape[0] == 112


def test_image_maps_equal_the_disk_cache_and_write_nothing(tiny_corpus: Path, tmp_path: Path, extractor: RegionFeatureExtractor) -> None:
    ann = read_annotations(tiny_corpus)[1]
    cache = FeatureCache(tiny_corpus, extractor, cache_dir=tmp_path / "c")
    before = sorted(tiny_corpus.rglob("*"))
    memory = ImageMaps(load_image(tiny_corpus / ann.image), ann.image, extractor)
    assert sorted(tiny_corpus.rglob("*")) == before  # no cache folder, no temporary file
    on_disk, in_memory = cache.get(ann.image), memory.get(ann.image)
    assert in_memory.size == on_disk.size
    for lvl in ("c3", "c4", "c5"):
        np.testing.assert_array_equal(in_memory.maps[lvl], on_disk.maps[lvl])
    boxes = np.asarray([r.box for r in ann.regions], np.float64)
    np.testing.assert_array_equal(memory.region_maps(ann.image, boxes), cache.region_maps(ann.image, boxes))
    with pytest.raises(KeyError):
        memory.get("another.png")


def test_an_entry_written_for_other_levels_is_completed_not_a_key_error(tiny_corpus: Path, tmp_path: Path, extractor: RegionFeatureExtractor) -> None:
    ann = read_annotations(tiny_corpus)[2]
    FeatureCache(tiny_corpus, extractor, levels=("c3", "c4"), cache_dir=tmp_path / "c").get(ann.image)  # e.g. MCB's cache
    full = FeatureCache(tiny_corpus, extractor, cache_dir=tmp_path / "c").get(ann.image)  # then the RPN's, over the same folder
    assert set(full.maps) == {"c3", "c4", "c5"}
    with np.load(next((tmp_path / "c").glob("*.npz"))) as data:
        assert {"c3", "c4", "c5"} <= set(data.files)  # rewritten with the union: neither head recomputes it again
    again = FeatureCache(tiny_corpus, extractor, levels=("c3", "c4"), cache_dir=tmp_path / "c").get(ann.image)
    np.testing.assert_array_equal(again.maps["c4"], full.maps["c4"])


def test_a_union_borrows_the_entries_of_its_linked_folders(tiny_corpus: Path, tmp_path: Path, extractor: RegionFeatureExtractor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A union dataset names a folder's image ``world/images/x.jpg`` under a link ``world`` to it: the
    folder's own cache entries are linked, never computed again."""
    import shutil
    from dataclasses import replace

    world = tmp_path / "world"
    shutil.copytree(tiny_corpus, world)
    anns = read_annotations(world)[:2]
    own = FeatureCache(world, extractor)  # the folder's default cache, as `engine train --data world` builds it
    own.build(anns, progress=False)
    union = tmp_path / "union"
    union.mkdir()
    (union / "world").symlink_to(world)
    cache = FeatureCache(union, extractor)
    monkeypatch.setattr(FeatureCache, "_compute", lambda *a, **k: pytest.fail("a borrowed entry was computed"))
    cache.build([replace(a, image=f"world/{a.image}") for a in anns], progress=False)
    got = cache.get(f"world/{anns[0].image}")
    np.testing.assert_array_equal(got.maps["c4"], own.get(anns[0].image).maps["c4"])
    assert len(list(cache.cache_dir.glob("*.npz"))) == 2
    assert not cache._borrow("world/images/none.jpg") and not cache._borrow("top-level.jpg")
