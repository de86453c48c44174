"""Visual key version: which vector stage 1's FAISS files hold, recorded in ``meta.visual_key``.

The region vector (the FAISS key) became the concatenation of per-level L2-normalised RoI means of
``c4`` and ``c5`` (432-d) instead of the ``c4`` mean alone (112-d). A new index records its key's
version (``efficientnet_lite0/640:c4+c5:mean:roi7:s2``) when it is created; opening an index for search
or indexing compares it with the engine's and refuses a mismatch with one line (re-index into a new
directory), so that vectors of two keys never mix. This revision records, for an index created before
it, the key its runs used, read from the latest run's ``region_features`` model version
(``efficientnet_lite0@imagenet-tf+roi_align:c4:7x7:s2:max640`` → ``efficientnet_lite0/640:c4:mean:roi7:s2``),
or ``unrecorded`` when there is none to read. A database being created (no ``arrays`` yet) is left to
its creator.

Revision ID: 0005_visual_key
Revises: 0004_feature_segments
Create Date: 2026-12-06

"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005_visual_key"
down_revision: str | Sequence[str] | None = "0004_feature_segments"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNRECORDED = "unrecorded (built before visual key versions)"

_FEATURES = re.compile(
    r"^(?P<backbone>[^@+]+)@[^+]*\+roi_align:(?P<level>\w+):(?P<size>\d+)x\d+:s(?P<sampling>\d+):max(?P<max>\d+)"
    r"(?:\+key:(?P<levels>[\w+]+):(?P<pooling>\w+))?$"
)


def key_of_run(region_features: str | None) -> str:
    """The visual key an index run's ``region_features`` version implies (the ``c4`` mean before the key
    was recorded: the level pooled was the key)."""
    m = _FEATURES.match(region_features or "")
    if m is None:
        return UNRECORDED
    levels = m["levels"] or m["level"]
    return f"{m['backbone']}/{m['max']}:{levels}:{m['pooling'] or 'mean'}:roi{m['size']}:s{m['sampling']}"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT 1 FROM meta WHERE key = 'arrays'")).first() is None:
        return  # being created: the creator records its key
    if bind.execute(sa.text("SELECT 1 FROM meta WHERE key = 'visual_key'")).first() is not None:
        return
    row = bind.execute(sa.text("SELECT models FROM index_runs ORDER BY id DESC LIMIT 1")).first()
    try:
        models = json.loads(row[0]) if row is not None and row[0] else {}
    except ValueError:
        models = {}
    key = key_of_run(models.get("region_features") if isinstance(models, dict) else None)
    bind.execute(sa.text("INSERT INTO meta (key, value) VALUES ('visual_key', :value)"), {"value": json.dumps(key)})


def downgrade() -> None:
    op.get_bind().execute(sa.text("DELETE FROM meta WHERE key = 'visual_key'"))
