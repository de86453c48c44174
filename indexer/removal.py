"""Removing images from an index by the paths a user types: files, or folders of indexed images.

The indexer records an image under the absolute path of its corpus folder (resolved) joined with
the file's path inside it (:mod:`indexer.scan`), so a user's path is tried in those forms: fully
resolved, with only its folder resolved (a symlinked image inside a corpus), and as given made
absolute. A path matches the image recorded under it, or every image recorded inside it (a
folder); it may name a file that no longer exists.

All or nothing: if any path matches nothing, :class:`InvalidInputError` names it and nothing is
removed. Otherwise one transaction deletes the images (indexed ones and error records) and their
regions, tombstoning the region ids, and the FAISS files are saved without them.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import InvalidInputError
from indexer.store import IndexStore

__all__ = ["RemoveSummary", "index_path_forms", "match_images", "remove_paths"]


@dataclass(frozen=True)
class RemoveSummary:
    """What ``engine remove`` did: images and error records removed, their regions, their paths."""

    images: int
    errors: int
    regions: int
    paths: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The stable ``engine remove --json`` form."""
        return {
            "images": self.images,
            "errors": self.errors,
            "regions": self.regions,
            "paths": list(self.paths),
        }


def index_path_forms(path: Path | str) -> list[str]:
    """The absolute forms under which the indexer may have recorded ``path`` (most likely first)."""
    given = Path(path).expanduser()
    absolute = Path(os.path.abspath(given))
    forms = [given.resolve(), absolute.parent.resolve() / absolute.name, absolute]
    return list(dict.fromkeys(str(form) for form in forms))


def match_images(store: IndexStore, path: Path | str) -> list[str]:
    """Recorded image paths at or under ``path`` (in any of its :func:`index_path_forms`), sorted."""
    found: dict[str, None] = {}
    for form in index_path_forms(path):
        found.update(dict.fromkeys(store.images_under(form)))
    return sorted(found)


def remove_paths(store: IndexStore, paths: Sequence[Path | str]) -> RemoveSummary:
    """Remove every image at or under ``paths`` from the writable ``store``; see the module docstring."""
    if not paths:
        raise InvalidInputError(
            "no paths to remove; pass image files or folders of indexed images, e.g. "
            "`engine remove corpus/old/`"
        )
    matched: dict[str, None] = {}
    for path in paths:
        found = match_images(store, path)
        if not found:
            raise InvalidInputError(
                f"{path} is not in the index at {store.path}: no image is indexed at or under "
                f"{index_path_forms(path)[0]}; nothing was removed"
            )
        matched.update(dict.fromkeys(found))
    deleted = store.delete_images(list(matched))
    store.save_vectors()
    return RemoveSummary(
        images=deleted.indexed,
        errors=deleted.errors,
        regions=deleted.regions,
        paths=tuple(sorted(matched)),
    )
