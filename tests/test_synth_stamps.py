"""The stamps world on a tiny fake stamps folder drawn by the test (no tuxpaint package needed)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from engine.cli import main as _cli  # the real CLI, which turns an EngineError into one line
from engine.datasets.annotations import read_dataset
from engine.errors import DataNotFoundError
from engine.synth.rle import rle_decode, rle_encode, rle_encode_box
from engine.synth.stamps import StampsConfig, generate_stamps_corpus, load_catalog, stamp_split
from engine.synth.stamps.language import noun_phrase, short_name, with_article

_CATEGORIES = ("animals/cats", "food/fruit", "symbols")
_COLOURS = ((220, 30, 30), (30, 160, 40), (30, 60, 220), (240, 200, 20), (160, 40, 200), (250, 120, 0))


def _h(key: str) -> int:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % 10


def _draw(path: Path, k: int) -> None:
    img = Image.new("RGBA", (90, 70), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    colour = _COLOURS[k % len(_COLOURS)] + (255,)
    if k % 2:
        d.ellipse((5, 5, 85, 65), fill=colour)
    else:
        d.polygon([(45, 2), (58, 28), (88, 30), (62, 48), (72, 68), (45, 55), (18, 68), (28, 48), (2, 30), (32, 28)], fill=colour)
    img.save(path)


@pytest.fixture(scope="module")
def stamps_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4+ stamps of every split in three category folders, plus files the catalog must ignore."""
    root = tmp_path_factory.mktemp("stamps")
    per_split = {"train": 0, "val": 0, "test": 0}
    n = 0
    while min(per_split.values()) < 4:
        cat = _CATEGORIES[n % len(_CATEGORIES)]
        name = f"thing{n}"
        key = f"{cat}/{name}"
        folder = root / cat
        folder.mkdir(parents=True, exist_ok=True)
        _draw(folder / f"{name}.png", n)
        shape = "star" if n % 2 == 0 else "disc"
        (folder / f"{name}.txt").write_text(f"A {shape} number {n}.\nfr.utf8=Une chose.\n", encoding="utf-8")
        per_split[stamp_split(key)] += 1
        n += 1
    (root / "animals/cats/thing0.dat").write_text("nomirror\n")
    _draw(root / "animals/cats/thing0_mirror.png", 0)  # no .txt: ignored
    (root / "animals/cats/thing3.svg").write_text("<svg/>")
    return root


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(2):
        base = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((300, 280), Image.Resampling.BICUBIC).save(d / f"p{i}.png")
    Image.new("RGB", (300, 300), (128, 128, 128)).save(d / "grey.png")  # not a photo: rejected
    return d


def _config(stamps_root: Path, photos_dir: Path, **kw) -> StampsConfig:
    base = dict(stamps_dir=stamps_root, images=24, seed=3, size=128, backgrounds_dirs=(photos_dir,), package_photos=False)
    base.update(kw)
    return StampsConfig(**base)


@pytest.fixture(scope="module")
def corpus(stamps_root: Path, photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "c"
    generate_stamps_corpus(out, _config(stamps_root, photos_dir))
    return out


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_split_rule_and_catalog(stamps_root: Path) -> None:
    for key in ("symbols/money/us/coins/025quarter", "animals/cats/thing1", "a"):
        h = _h(key)
        assert stamp_split(key) == ("test" if h in (0, 1) else "val" if h == 2 else "train")
    catalog = load_catalog(stamps_root)
    keys = {s.key for s in catalog}
    assert "animals/cats/thing0_mirror" not in keys and all(not k.endswith(".svg") for k in keys)
    thing0 = next(s for s in catalog if s.key == "animals/cats/thing0")
    assert thing0.category == "animals/cats" and not thing0.mirror and thing0.split == stamp_split("animals/cats/thing0")
    assert thing0.description == "a star number 0" and thing0.name == "star number 0"
    assert all(s.mirror for s in catalog if s.key != "animals/cats/thing0")


def test_heldout_images_hold_no_train_stamp(corpus: Path) -> None:
    images = _lines(corpus / "annotations.jsonl")
    assert {im["split"] for im in images} == {"train", "val", "test"}
    for im in images:
        for o in im["objects"]:
            assert stamp_split(o["stamp"]) == im["split"], (im["image"], o["stamp"])
            assert o["category"] == o["stamp"].rsplit("/", 1)[0]


def test_masks_and_boxes_are_exact(corpus: Path) -> None:
    read_dataset(corpus)  # the schema holds
    for im in _lines(corpus / "annotations.jsonl"):
        assert 2 <= len(im["objects"]) <= 6 and 2 <= len(im["captions"]) <= 3
        union = np.zeros((im["height"], im["width"]), dtype=bool)
        for o in im["objects"]:
            mask = rle_decode(o["mask"])
            assert not (mask & union).any()  # visible masks never overlap
            union |= mask
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            assert o["box"] == [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
            assert o["area"] == int(mask.sum()) and o["visible"] >= 0.7 - 1e-9
        assert np.array_equal(rle_decode(im["saliency"]), union)
        ids = {o["id"] for o in im["objects"]}
        objects = [r for r in im["regions"] if r["kind"] == "object"]
        assert [r["objects"][0] for r in objects] == [o["id"] for o in im["objects"]]
        assert all(r["id"] == r["objects"][0] + 100 for r in objects)
        for r, o in zip(objects, im["objects"]):
            assert r["box"] == o["box"] and r["description"] == o["description"]
        for r in im["regions"]:
            if r["kind"] == "pair":
                assert len(r["objects"]) == 2 and set(r["objects"]) <= ids and r["relation"]
        for f in im["refs"]:
            assert f["expression"].startswith("the ") and f["object"] in ids


def test_queries_have_positives_of_the_same_stamp_in_other_images(corpus: Path) -> None:
    images = _lines(corpus / "annotations.jsonl")
    region = {}
    for im in images:
        stamp_of = {o["id"]: o["stamp"] for o in im["objects"]}
        cat_of = {o["id"]: o["category"] for o in im["objects"]}
        for r in im["regions"]:
            if r["kind"] == "object":
                region[r["id"]] = (im["image"], im["split"], stamp_of[r["objects"][0]], cat_of[r["objects"][0]])
    queries = _lines(corpus / "queries.jsonl")
    assert queries
    for q in queries:
        image, split, stamp, cat = region[q["region_id"]]
        assert (q["image"], q["split"], q["stamp"]) == (image, split, stamp)
        assert q["region_id"] not in q["positives"]
        assert all(region[p][1:3] == (split, stamp) for p in q["positives"])
        assert any(region[p][0] != image for p in q["positives"])
        assert all(region[h][1] == split and region[h][3] == cat and region[h][2] != stamp for h in q["hard_negatives"])
        everything = {rid for rid, (_, s, st, _) in region.items() if (s, st) == (split, stamp)} - {q["region_id"]}
        assert set(q["positives"]) == everything
    per = {}
    for q in queries:
        per.setdefault((q["split"], q["stamp"]), []).append(q)
    assert all(len(v) <= 4 for v in per.values())


def test_deterministic(stamps_root: Path, photos_dir: Path, corpus: Path, tmp_path: Path) -> None:
    generate_stamps_corpus(tmp_path / "again", _config(stamps_root, photos_dir))
    names = sorted(p.relative_to(corpus) for p in corpus.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for name in names:
        assert (corpus / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_rle_encode_box_matches_rle_encode() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        h, w = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        bh, bw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        local = rng.random((bh, bw)) < 0.5
        full = np.zeros((h, w), dtype=bool)
        full[y : y + bh, x : x + bw] = local
        assert rle_encode_box(local, x, y, h, w) == rle_encode(full)


def test_language() -> None:
    assert noun_phrase("A US 25 cent piece ($.25) called a quarter.") == "a US 25 cent piece ($.25) called a quarter"
    assert short_name("A US 25 cent piece ($.25) called a quarter.", "025quarter") == "US 25 cent piece"
    assert short_name("A stethoscope lets your doctor listen to your heart.", "stethoscope") == "stethoscope"
    assert short_name("An Indian blackbuck.", "x") == "Indian blackbuck"
    assert [with_article(n) for n in ("apple", "tiger", "European coin")] == ["an apple", "a tiger", "a European coin"]



def test_cli_stamps_world_and_its_errors(stamps_root: Path, photos_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["synth", str(tmp_path / "c"), "--world", "stamps", "--images", "4", "--size", "128", "--quiet"]
    result = runner.invoke(_cli, [*args, "--stamps-dir", str(stamps_root), "--backgrounds-dir", str(photos_dir)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("wrote 4 images,") and "images/s" in result.output
    result = runner.invoke(_cli, [*args, "--stamps-dir", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "--stamps-dir" in result.output and len(result.output.strip().splitlines()) == 1
    (tmp_path / "empty/animals").mkdir(parents=True)
    (tmp_path / "empty/animals/cat.png").write_bytes(b"")  # a PNG without a description
    result = runner.invoke(_cli, [*args, "--stamps-dir", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "no PNG stamp with a .txt description" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_split_is_an_error(stamps_root: Path, photos_dir: Path, tmp_path: Path) -> None:
    only = tmp_path / "few"
    (only / "x").mkdir(parents=True)
    key = next(f"x/s{i}" for i in range(100) if stamp_split(f"x/s{i}") == "train")
    _draw(only / f"{key}.png", 1)
    (only / f"{key}.txt").write_text("A disc.\n")
    with pytest.raises(DataNotFoundError, match="no stamp of the val split"):
        generate_stamps_corpus(tmp_path / "c", _config(only, photos_dir, images=2))


def test_a_folder_above_the_stamps_folder_is_refused(stamps_root: Path, tmp_path: Path) -> None:
    """Keys, and so the fixed split, are paths below the stamps folder: pointing above it would change every split."""
    import shutil

    nested = tmp_path / "pkg" / "usr" / "share" / "tuxpaint" / "stamps"
    shutil.copytree(stamps_root, nested)
    result = CliRunner().invoke(_cli, ["synth", str(tmp_path / "c"), "--world", "stamps", "--stamps-dir", str(tmp_path / "pkg"), "--images", "2", "--quiet"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"pass --stamps-dir {nested}" in result.output
    assert not (tmp_path / "c").exists()
    assert len(load_catalog(nested)) == len(load_catalog(stamps_root))
