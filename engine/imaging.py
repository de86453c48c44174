"""Image geometry shared by the backbone, the feature cache and the models (no torch, no PIL).

The backbone scales every image so that its longest side is at most ``max_size``; models that map
boxes or masks between original pixels and the backbone's frame use the same rule, from here.
"""
from __future__ import annotations

__all__ = ["resized_size"]


def resized_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """``(width, height)`` after scaling the longest side down to ``max_size`` (aspect kept; never upsampled, never below 1)."""
    longest = max(width, height)
    if longest <= max_size:
        return width, height
    scale = max_size / longest
    return max(1, round(width * scale)), max(1, round(height * scale))
