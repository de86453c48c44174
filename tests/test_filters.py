"""HitFilter: every field of a filter is type-checked into one clear InvalidInputError (batch lines
carry them as JSON, so anything can arrive)."""
from __future__ import annotations

import pytest

from engine.errors import InvalidInputError
from query.filters import HitFilter


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"path_glob": 5}, "--path-glob must be a string pattern, got int 5"),
        ({"path_glob": ["*"]}, "--path-glob must be a string pattern, got list"),
        ({"path_glob": " "}, "--path-glob is empty"),
        ({"min_score": "abc"}, "--min-score must be a finite number, got 'abc'"),
        ({"min_score": True}, "--min-score must be a finite number"),
        ({"min_score": float("inf")}, "--min-score must be a finite number"),
        ({"min_score": 10**400}, "--min-score must be a finite number"),
        ({"max_per_image": 2.5}, "--max-per-image must be an integer >= 0"),
        ({"max_per_image": True}, "--max-per-image must be an integer >= 0"),
        ({"max_per_image": "3"}, "--max-per-image must be an integer >= 0"),
        ({"duplicate_iou": "x"}, "duplicate_iou must be in"),
        ({"duplicate_iou": float("nan")}, "duplicate_iou must be in"),
    ],
)
def test_wrong_typed_filters_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as info:
        HitFilter(**kwargs)
    assert "\n" not in str(info.value)


def test_good_filters_are_taken() -> None:
    f = HitFilter(path_glob="*/a/*", min_score=0, max_per_image=2, duplicate_iou=1)
    assert f.active and f.matches("/x/a/b.jpg") and not f.matches("/x/b.jpg")
