"""The feature arrays an index stores: their names, and their row shapes as :class:`ArraySpec`.

Every index has ``visual`` (the FAISS vector); the others depend on how it was built (``engine index
--no-maps`` drops ``maps``; indexes from before SAN, the pooled array or the stored Ref-NMS features
lack those). The shapes are recorded in ``meta.arrays`` when the index is created (:mod:`indexer.db_state`).
"""
from __future__ import annotations

from collections.abc import Mapping

from engine.errors import InvalidInputError
from indexer.feature_store import ArraySpec
from indexer.index_dir import check_array_name

__all__ = [
    "VECTOR_ARRAY",
    "SAN_ARRAY",
    "MAPS_ARRAY",
    "REFNMS_ARRAY",
    "POOLED_ARRAY",
    "CONCEPT_ARRAY",
    "INSTANCE_ARRAY",
    "specs_from_shapes",
    "describe_specs",
    "vector_arrays",
]

#: The feature-store array whose rows are the FAISS vectors.
VECTOR_ARRAY = "visual"
#: The feature-store array of SAN region embeddings; when an index has it, it gets its own FAISS file.
SAN_ARRAY = "san"
MAPS_ARRAY = "maps"  # the 7×7 RoI maps; absent from an index built with ``engine index --no-maps``
REFNMS_ARRAY = "refnms"  # Ref-NMS's text-independent visual feature v_i of each region (query stage 3)
POOLED_ARRAY = "pooled"  # the un-normalised spatial mean of each 7×7 map: all a non-spatial stage 2 (grn-fc) reads
CONCEPT_ARRAY = "concepts"  # each region's top ImageNet classes and probabilities [2, T] (indexer/concept_evidence.py)
INSTANCE_ARRAY = "instance"  # each region's instance-head embedding (engine/models/instance_head.py; query stage 2)


def specs_from_shapes(array_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, ArraySpec]:
    """The specs of ``array_shapes`` (row shape per array name); it must hold a 1-d ``visual`` array."""
    specs = {check_array_name(name): ArraySpec(tuple(shape)) for name, shape in array_shapes.items()}
    if VECTOR_ARRAY not in specs or len(specs[VECTOR_ARRAY].shape) != 1:
        raise InvalidInputError(
            f"array_shapes {dict(array_shapes)} lack a 1-d {VECTOR_ARRAY!r} array (the FAISS "
            f"vector); add e.g. {VECTOR_ARRAY!r}: (112,)"
        )
    return specs


def describe_specs(specs: Mapping[str, ArraySpec]) -> str:
    """``"maps(112, 7, 7), visual(112,)"``: for error messages."""
    return ", ".join(f"{n}{spec.shape}" for n, spec in sorted(specs.items()))


def vector_arrays(specs: Mapping[str, ArraySpec]) -> tuple[str, ...]:
    """The arrays with a FAISS file: ``visual``, and ``san`` when the index stores it."""
    return tuple(n for n in (VECTOR_ARRAY, SAN_ARRAY) if n in specs)
