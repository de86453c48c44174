"""Tombstones of deleted regions for FAISS catch-up; index images by content hash.

Before this revision a deleted region stayed in the saved FAISS file until the next full rebuild.
``tombstones`` records each deleted region id under a gap-free ``seq``, so that an opened index can
remove exactly the deletions its FAISS file has not applied yet. The index on
``images.content_hash`` serves look-ups of moved or duplicated files.

Revision ID: 0002_tombstones
Revises: 0001_initial
Create Date: 2026-05-20

"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002_tombstones"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tombstones",
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("region_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_tombstones")),
        sqlite_autoincrement=True,  # seq must grow without reuse: catch-up relies on it
    )
    op.create_index(op.f("ix_images_content_hash"), "images", ["content_hash"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_images_content_hash"), table_name="images")
    op.drop_table("tombstones")
