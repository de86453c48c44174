"""Feature store: append-only float16 arrays, memory-mapped reads, uncommitted tails."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.errors import EngineError, InvalidInputError
from indexer.feature_store import ArraySpec, FeatureArray, FeatureStore

SPECS = {"maps": ArraySpec((3, 2, 2)), "visual": ArraySpec((5,))}


def _rows(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {name: rng.standard_normal((n, *spec.shape)) for name, spec in SPECS.items()}


def _open(directory: Path, committed: int, writable: bool = True) -> FeatureStore:
    return FeatureStore(directory, SPECS, committed_rows=committed, writable=writable)


def test_append_read_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a, b = _rows(rng, 4), _rows(rng, 3)
    store = _open(tmp_path / "features", 0)
    assert store.append(a) == 0
    assert store.append(b) == 4
    store.flush()
    store.mark_committed()
    assert store.committed_rows == 7
    rows = np.array([6, 0, 4, 4])
    for name in SPECS:
        want = np.concatenate([a[name], b[name]]).astype(np.float16)[rows]
        got = store.read(name, rows)
        assert got.dtype == np.float16 and got.shape == (4, *SPECS[name].shape)
        np.testing.assert_array_equal(got, want)
    assert (tmp_path / "features" / "visual.f16").stat().st_size == 7 * 5 * 2
    assert store.read("visual", np.array([], dtype=np.int64)).shape == (0, 5)
    store.close()


def test_reopen_truncates_uncommitted_tail(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    committed = _rows(rng, 2)
    store = _open(tmp_path, 0)
    store.append(committed)
    store.flush()
    store.mark_committed()
    store.append(_rows(rng, 5))  # a crash before the database commit leaves these
    store.flush()
    store.close()
    assert (tmp_path / "visual.f16").stat().st_size == 7 * 10

    store = _open(tmp_path, 2)  # the database says 2 rows are committed
    assert (tmp_path / "visual.f16").stat().st_size == 2 * 10
    fresh = _rows(rng, 1)
    assert store.append(fresh) == 2
    store.flush()
    store.mark_committed()
    np.testing.assert_array_equal(
        store.read("visual", np.arange(3)),
        np.concatenate([committed["visual"], fresh["visual"]]).astype(np.float16),
    )
    store.close()


def test_rollback_overwrites_at_committed_end(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    store = _open(tmp_path, 0)
    store.append(_rows(rng, 3))
    store.rollback()
    good = _rows(rng, 2)
    assert store.append(good) == 0
    store.flush()
    store.mark_committed()
    assert (tmp_path / "maps.f16").stat().st_size == 2 * 12 * 2
    np.testing.assert_array_equal(store.read("maps", np.arange(2)), good["maps"].astype(np.float16))
    store.close()


def test_reader_remaps_when_writer_appends(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    writer = _open(tmp_path, 0)
    first = _rows(rng, 2)
    writer.append(first)
    writer.flush()
    writer.mark_committed()
    reader = _open(tmp_path, 2, writable=False)
    np.testing.assert_array_equal(reader.read("visual", np.array([1])), first["visual"][1:2].astype(np.float16))
    second = _rows(rng, 3)
    writer.append(second)
    writer.flush()
    writer.mark_committed()
    np.testing.assert_array_equal(reader.read("visual", np.array([4])), second["visual"][2:3].astype(np.float16))
    with pytest.raises(EngineError, match="read-only"):
        reader.append(second)
    with pytest.raises(EngineError, match="holds 5 rows"):
        reader.read("visual", np.array([5]))
    reader.close()
    writer.close()


def test_bad_input_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    store = _open(tmp_path, 0)
    bad = _rows(rng, 2)
    bad["maps"] = bad["maps"][:, :2]
    with pytest.raises(InvalidInputError, match=r"rows of shape \(2, 2, 2\).*\(3, 2, 2\)"):
        store.append(bad)
    assert store.append(_rows(rng, 1)) == 0  # the failed append left nothing behind
    uneven = _rows(rng, 2)
    uneven["visual"] = uneven["visual"][:1]
    with pytest.raises(InvalidInputError, match="different row counts"):
        store.append(uneven)
    with pytest.raises(InvalidInputError, match="do not match"):
        store.append({"visual": rng.standard_normal((1, 5))})
    with pytest.raises(InvalidInputError, match="negative"):
        store.read("visual", np.array([-1]))
    with pytest.raises(InvalidInputError, match="does not exist"):
        store.read("nope", np.array([0]))
    with pytest.raises(InvalidInputError, match="not allowed"):
        ArraySpec((0, 3))
    with pytest.raises(InvalidInputError, match="not allowed"):
        FeatureStore(tmp_path, {"Bad/Name": ArraySpec((2,))}, committed_rows=0, writable=True)
    store.close()


def test_file_shorter_than_committed_is_damage(tmp_path: Path) -> None:
    (tmp_path / "visual.f16").write_bytes(b"\0" * 10)
    with pytest.raises(EngineError, match="holds 1 rows but the index refers to 3"):
        FeatureArray(tmp_path / "visual.f16", SPECS["visual"], committed_rows=3, writable=True)
