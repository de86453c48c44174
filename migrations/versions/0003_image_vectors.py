"""Image vectors: the mean backbone feature of each indexed image (CM-Att's ``e_0``).

Query stage 3 grounds the query text in each of the best images with CM-Att, whose language
attention reads the whole image's mean feature vector (CM-Att Eq. 4). It does not depend on the
query, so indexing stores it: ``images.vector`` holds it as float16 bytes. Images indexed before
this revision have NULL there; stage 3 then recomputes it from the image file.

Revision ID: 0003_image_vectors
Revises: 0002_tombstones
Create Date: 2026-11-23

"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003_image_vectors"
down_revision: str | Sequence[str] | None = "0002_tombstones"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("vector", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("vector")
