"""engine/config.py: EngineConfig refuses stage-2 weights it cannot rank with, in one line."""
from __future__ import annotations

import pytest

from engine.config import MAX_WEIGHT, EngineConfig
from engine.errors import InvalidInputError


@pytest.mark.parametrize(
    "kwargs",
    [
        {"text_weight": -1.0},
        {"image_weight": float("nan")},
        {"text_weight": float("inf")},
        {"image_weight": 1e308},
        {"text_weight": MAX_WEIGHT * 1.01},
        {"text_weight": True},
        {"image_weight": "2"},
    ],
)
def test_weights_outside_the_finite_range_are_refused(kwargs: dict) -> None:
    with pytest.raises(InvalidInputError, match="must be a finite number from 0 to 100") as info:
        EngineConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_weights_at_the_bounds_are_taken() -> None:
    config = EngineConfig(text_weight=0.0, image_weight=MAX_WEIGHT)
    assert (config.text_weight, config.image_weight) == (0.0, MAX_WEIGHT)
    with pytest.raises(InvalidInputError, match="both 0"):
        EngineConfig(text_weight=0, image_weight=0)
