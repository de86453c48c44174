"""Typed results of the public API. Their ``to_dict`` forms are the stable ``--json`` output."""
from __future__ import annotations

from dataclasses import dataclass

from engine.boxes import Box

__all__ = ["Hit"]


@dataclass(frozen=True)
class Hit:
    """One search result: a region of an indexed image. ``box`` is pixel ``(x1, y1, x2, y2)``."""

    image: str
    box: Box
    score: float
    region_id: int

    def to_dict(self) -> dict[str, object]:
        return {"image": self.image, "box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 6), "region_id": int(self.region_id)}
