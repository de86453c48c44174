"""SQLAlchemy 2.0 declarative models of ``engine.db``, the SQLite database of an index.

The models describe the schema at the newest Alembic revision (``head``). They are never used to
create tables: ``migrations/versions/*.py`` create and alter the schema, and
``tests/test_migrations.py`` checks that the two agree (``alembic.autogenerate.compare_metadata``).
A schema change therefore touches both this file and a new revision.

Tables (see ``docs/index-layout.md``):

* ``images``      one row per image file seen by a run (``status`` 'indexed' or 'error').
* ``regions``     one row per region of an indexed image; ``id`` is the FAISS id and is never reused
                  (``AUTOINCREMENT``); ``row`` is the region's row in every feature-store array.
* ``index_runs``  one row per ``engine index`` run with its counts and model versions.
* ``tombstones``  region ids deleted from ``regions`` that the saved FAISS file may still hold.
* ``meta``        key -> JSON value facts about the index (array shapes, next feature row, ...).
* ``feature_segments``  the crc32 of the feature rows each commit (or compaction) wrote, per array.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "NAMING_CONVENTION",
    "IMAGE_STATUSES",
    "REGION_SOURCES",
    "RUN_STATUSES",
    "Base",
    "Image",
    "Region",
    "IndexRun",
    "Tombstone",
    "Meta",
    "FeatureSegment",
]

#: Constraint names are derived from this convention, so that migrations can refer to them
#: (SQLite batch mode needs named constraints to drop or alter them).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

IMAGE_STATUSES = ("indexed", "error")
REGION_SOURCES = ("gt", "selective-search", "rpn")
RUN_STATUSES = ("running", "completed", "failed")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class IndexRun(Base):
    """One ``engine index`` run. ``models`` is a JSON object: model role -> name/version."""

    __tablename__ = "index_runs"
    __table_args__ = (CheckConstraint(_in("status", RUN_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    corpus: Mapped[str] = mapped_column(String, nullable=False)
    status: Mapped[str] = mapped_column(String, nullable=False)
    processed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    removed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    regions_added: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    errors: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    seconds: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    models: Mapped[str] = mapped_column(Text, nullable=False, default="{}")


class Image(Base):
    """An image file. ``path`` is the absolute resolved path; ``content_hash`` its sha256 (hex).

    ``vector`` is the mean backbone feature of the image (query stage 3's image vector).
    Rows with ``status='error'`` record why the file could not be indexed; their stat and hash
    columns are NULL when the file could not even be read.
    """

    __tablename__ = "images"
    __table_args__ = (CheckConstraint(_in("status", IMAGE_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String, nullable=False, unique=True)
    content_hash: Mapped[str | None] = mapped_column(String, nullable=True, index=True)
    size_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    mtime_ns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String, nullable=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    run_id: Mapped[int | None] = mapped_column(
        Integer, ForeignKey("index_runs.id", ondelete="SET NULL"), nullable=True
    )
    indexed_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False)
    vector: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    """The image's mean backbone feature (float16 bytes; CM-Att's ``e_0``); NULL for images indexed
    before revision 0003 and for error rows."""


class Region(Base):
    """A region (box) of an indexed image. ``id`` doubles as the FAISS id and is never reused."""

    __tablename__ = "regions"
    __table_args__ = (
        CheckConstraint(_in("source", REGION_SOURCES), name="source"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("images.id", ondelete="CASCADE"), nullable=False, index=True
    )
    x1: Mapped[float] = mapped_column(Float, nullable=False)
    y1: Mapped[float] = mapped_column(Float, nullable=False)
    x2: Mapped[float] = mapped_column(Float, nullable=False)
    y2: Mapped[float] = mapped_column(Float, nullable=False)
    objectness: Mapped[float] = mapped_column(Float, nullable=False)
    source: Mapped[str] = mapped_column(String, nullable=False)
    row: Mapped[int] = mapped_column(Integer, nullable=False, unique=True)


class Tombstone(Base):
    """A region deleted from ``regions`` whose removal the saved FAISS file may not hold yet.

    ``seq`` grows without gaps; rows at or below the ``max_tombstone_seq`` of the saved FAISS
    file are pruned after each save.
    """

    __tablename__ = "tombstones"
    __table_args__ = ({"sqlite_autoincrement": True},)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    region_id: Mapped[int] = mapped_column(Integer, nullable=False)


class Meta(Base):
    """Key -> JSON-encoded value (``arrays``, ``vector_array``, ``next_row``, ``models``, ...)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)



class FeatureSegment(Base):
    """The rows ``first_row .. first_row + n_rows - 1`` of feature array ``array`` in feature-store
    ``generation``, written by one commit (or one step of a compaction), and the crc32 of their bytes.

    ``engine check`` (:mod:`indexer.integrity`) compares the files with these; rows no segment covers
    were written before revision 0004 (unrecorded, not damaged).
    """

    __tablename__ = "feature_segments"

    array: Mapped[str] = mapped_column(String, primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, primary_key=True)
    first_row: Mapped[int] = mapped_column(Integer, primary_key=True)
    n_rows: Mapped[int] = mapped_column(Integer, nullable=False)
    crc32: Mapped[int] = mapped_column(Integer, nullable=False)
