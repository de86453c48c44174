"""Typed results of the public API. Their ``to_dict`` forms are the stable ``--json`` output."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.boxes import Box

__all__ = ["Hit", "hits_payload"]


@dataclass(frozen=True)
class Hit:
    """One search result: a region of an indexed image. ``box`` is pixel ``(x1, y1, x2, y2)``.

    ``score`` ranks the hits; ``scores`` holds its parts when several stages scored it (e.g. the
    stage-1 ``visual`` cosine and the stage-2 ``grn`` similarity).
    """

    image: str
    box: Box
    score: float
    region_id: int
    scores: dict[str, float] = field(default_factory=dict)
    content_hash: str | None = field(default=None, compare=False)
    """The image file's sha256 (not in ``to_dict``): copies of one picture share it."""

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "image": self.image,
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 6),
            "region_id": int(self.region_id),
        }
        if self.scores:
            out["scores"] = {k: round(float(v), 6) for k, v in self.scores.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "Hit":
        """The hit of a :meth:`to_dict` form (e.g. a server's answer)."""
        box = tuple(float(v) for v in data["box"])  # type: ignore[union-attr]
        scores = {str(k): float(v) for k, v in dict(data.get("scores") or {}).items()}  # type: ignore[call-overload]
        return cls(image=str(data["image"]), box=box, score=float(data["score"]), region_id=int(data["region_id"]), scores=scores)  # type: ignore[arg-type]


def hits_payload(hits: Iterable[Hit]) -> dict[str, list[dict[str, object]]]:
    """``{"hits": [...]}``: what ``engine query --json`` prints and ``POST /api/search`` answers (one form for both)."""
    return {"hits": [h.to_dict() for h in hits]}
