"""SearchRequest.validate: each bad request is one clear InvalidInputError, before any model loads."""
from __future__ import annotations

import pytest

from engine.errors import InvalidInputError
from query.request import MAX_REGION_ID, MAX_TEXT_CHARS, SearchRequest


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"text": 5}, "--text must be a string"),
        ({"image": 3}, "--image must be a file path"),
        ({"text": "red", "k": 0}, "k must be a positive integer"),
        ({"text": "  \t"}, "--text is empty"),
        ({"text": "red circle " * 200}, f"at most {MAX_TEXT_CHARS:,}"),
        ({}, "a query needs an image, a region id or a text"),
        ({"text": "red", "region": (0, 0, 5, 5)}, "--region needs --image"),
        ({"region_id": 3, "image": "a.jpg"}, "--region-id is a query by itself"),
    ],
)
def test_bad_requests_are_refused_with_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as info:
        SearchRequest(**kwargs).validate()
    assert "\n" not in str(info.value)


def test_texts_up_to_the_limit_are_accepted() -> None:
    SearchRequest(text="a" * MAX_TEXT_CHARS).validate()
    SearchRequest(text="a red circle left of a blue square").validate()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"region_id": 2**63}, "out of range: region ids are 0 to 2\\^63-1"),
        ({"region_id": 10**400}, "out of range"),
        ({"region_id": -1}, "out of range"),
        ({"region_id": True}, "must be an integer region id"),
        ({"text": "red", "exclude_self": "yes"}, "exclude_self must be true or false"),
        ({"text": "red", "id": float("nan")}, "id must be a string, an integer or a finite number"),
        ({"text": "red", "filters": {"path_glob": "*"}}, "filters must be a HitFilter"),
    ],
)
def test_out_of_range_and_wrong_typed_fields_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as info:
        SearchRequest(**kwargs).validate()
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_largest_region_id_is_valid() -> None:
    SearchRequest(region_id=MAX_REGION_ID).validate()
