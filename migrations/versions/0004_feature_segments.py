"""Feature segments: the crc32 of the feature rows each commit (or compaction) wrote.

Every commit appends rows to every feature array; ``feature_segments`` records, per array, the rows it
wrote (``first_row``, ``n_rows``, in feature-store ``generation``) and the crc32 of their bytes, so that
``engine check`` can tell rows damaged on disk from good ones (docs/index-layout.md, "Checksums").
Rows written before this revision have no segment: they are *unrecorded*, not damaged.

Revision ID: 0004_feature_segments
Revises: 0003_image_vectors
Create Date: 2026-12-06

"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004_feature_segments"
down_revision: str | Sequence[str] | None = "0003_image_vectors"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "feature_segments",
        sa.Column("array", sa.String(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("first_row", sa.Integer(), nullable=False),
        sa.Column("n_rows", sa.Integer(), nullable=False),
        sa.Column("crc32", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("array", "generation", "first_row", name=op.f("pk_feature_segments")),
    )


def downgrade() -> None:
    op.drop_table("feature_segments")
