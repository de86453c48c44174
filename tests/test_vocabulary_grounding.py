"""Grounding any English phrase among a photograph's proposals through the open vocabulary
(``engine ground --method vocabulary|auto``), and its map of proposal scores."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.cli import main
from query.vocabulary_grounding import proposal_heat


@pytest.fixture(scope="module")
def cat_photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import skimage.data

    path = tmp_path_factory.mktemp("photo") / "chelsea.jpg"
    Image.fromarray(skimage.data.chelsea()).save(path, quality=92)
    return path


def test_proposal_heat_keeps_the_best_box_at_each_pixel() -> None:
    boxes = np.array([[0, 0, 4, 4], [2, 2, 6, 6], [7, 0, 8, 1]], np.float64)
    heat = proposal_heat(boxes, np.array([0.2, 0.6, 0.4], np.float32), (10, 8))
    assert heat.shape == (8, 10)
    assert heat[0, 0] == pytest.approx(0.0)  # the lowest score
    assert heat[3, 3] == pytest.approx(1.0) and heat[5, 5] == pytest.approx(1.0)  # the best box wins where they overlap
    assert heat[0, 7] == pytest.approx(0.5)
    assert heat[7, 9] == 0.0  # no box there
    assert proposal_heat(np.zeros((0, 4)), np.zeros(0, np.float32), (3, 2)).sum() == 0


def test_vocabulary_scores_are_the_search_formula() -> None:
    from engine.api import Engine
    import skimage.data

    grounder = Engine(Path("unused-index")).vocabulary_grounder()
    [scored] = grounder.score(Image.fromarray(skimage.data.coffee()), ["a cup of espresso"])
    assert len(scored.boxes) == len(scored.scores) == len(scored.objectness) > 1
    logs = np.log(np.maximum(scored.objectness.astype(np.float64), 1e-4))
    prior = logs - logs.max()  # the proposal prior, relative to the image's best proposal
    assert grounder.proposal_weight > 0
    np.testing.assert_allclose(scored.scores, scored.concept + grounder.projection_weight * scored.projection + grounder.proposal_weight * prior, atol=1e-5)
    [grounding] = grounder.ground(Image.fromarray(skimage.data.coffee()), ["a cup of espresso"])
    assert grounding.method == "vocabulary" and grounding.peak == pytest.approx(float(scored.scores.max()))
    assert grounding.heat.max() == pytest.approx(1.0)


def test_ground_cli_understands_any_english(cat_photo: Path, tmp_path: Path) -> None:
    out = tmp_path / "kitten.png"
    result = CliRunner().invoke(main, ["ground", str(cat_photo), "--text", "a sleeping kitten", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["method"] == "vocabulary"  # auto: MCB does not know "kitten"
    x1, y1, x2, y2 = found["box"]
    w, h = Image.open(cat_photo).size
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert (x2 - x1) * (y2 - y1) > 0.1 * w * h  # the cat fills the photograph: not a sliver
    assert Image.open(out).size == (2 * w + 8, h + 16)
    shapes = CliRunner().invoke(main, ["ground", str(cat_photo), "--text", "a red circle", "--json"])
    assert json.loads(shapes.output)["method"] == "attention"  # the shapes words keep MCB
    forced = CliRunner().invoke(main, ["ground", str(cat_photo), "--text", "a red circle", "--method", "vocabulary", "--json"])
    assert json.loads(forced.output)["method"] == "vocabulary"


def test_vocabulary_method_takes_no_model(cat_photo: Path) -> None:
    result = CliRunner().invoke(main, ["ground", str(cat_photo), "--text", "a cat", "--method", "vocabulary", "--model", "mcb"])
    assert result.exit_code != 0 and "--method vocabulary" in result.output and "Traceback" not in result.output
