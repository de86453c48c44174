

REVISIONS: tuple[str, ...] = (
    "0001_initial",
    "0002_tombstones",
    "0003_image_vectors",
    "0004_feature_segments",
    "0005_visual_key",
)
"""The revision ids of ``versions/``, oldest first (the last is the head). Opening an index compares its
revision with these without importing Alembic (~0.2 s of every command's start);
``tests/test_migrations.py`` checks them against Alembic's own walk. A new revision is added here too."""

