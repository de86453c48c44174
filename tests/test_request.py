"""SearchRequest.validate: each bad request is one clear InvalidInputError, before any model loads."""
from __future__ import annotations

import pytest

from engine.errors import InvalidInputError
from query.request import MAX_TEXT_CHARS, SearchRequest


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
