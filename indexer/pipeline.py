"""The indexing pipeline: scan a corpus, propose regions, extract their features, commit them image by image."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from engine.diskspace import disk_full_error
from engine.errors import InvalidInputError
from indexer.catalog import RunCounts
from indexer.extraction import BatchExtraction, ExtractedBatch
from indexer.scan import FileEntry, ScanIssue, plan_scan, scan_corpus
from indexer.store import IndexStore

__all__ = ["IndexSummary", "IndexingPipeline", "INDEX_DISK_ADVICE", "ProgressCallback", "BatchExecutor", "ImageSelector"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""``on_progress(done, total)``: images processed so far of those the run's scan planned to process."""

BatchExecutor = Callable[[BatchExtraction, Iterable[list[FileEntry]]], Iterator[ExtractedBatch]]
"""Runs the extraction over the batches and yields their results IN ORDER (in this process by default;
``engine/distributed/ray_indexing.py`` spreads them over Ray workers)."""

ImageSelector = Callable[[Path], bool]
"""Which image files of the corpus this run indexes (a sharded index: those hashed to one shard)."""


def run_here(extraction: BatchExtraction, batches: Iterable[list[FileEntry]]) -> Iterator[ExtractedBatch]:
    """The default executor: each batch extracted in this process, one after the other."""
    return map(extraction, batches)

INDEX_DISK_ADVICE = "free space and re-run `engine index`, which resumes where it stopped (everything committed so far is kept)"


@dataclass(frozen=True)
class IndexSummary(RunCounts):
    """What one ``engine index`` run did (the counts its run records)."""

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class IndexingPipeline:
    """Runs one indexing pass of ``corpus`` into an open, writable :class:`IndexStore`.

    Images are committed in batches of ``batch_size``; each image's regions become visible together
    with its metadata at the commit, so an interrupted run loses nothing committed and resumes.
    """

    def __init__(
        self,
        *,
        store: IndexStore,
        extraction: BatchExtraction,
        batch_size: int = 8,
        save_every: int = 2000,
        models: dict[str, str] | None = None,
        executor: BatchExecutor = run_here,
    ) -> None:
        if batch_size <= 0:
            raise InvalidInputError(f"--batch-size must be a positive integer, got {batch_size}")
        self.store = store
        self.extraction = extraction
        self.batch_size = batch_size
        self.save_every = save_every
        self.models = models or {}
        self.executor = executor

    def run(self, corpus: Path, *, progress: bool = True, skip: tuple[Path, ...] = (), on_progress: ProgressCallback | None = None, select: ImageSelector | None = None, label: str = "indexing") -> IndexSummary:
        """Index ``corpus`` (only the image files ``select`` accepts, when given); a full disk is one
        :class:`DiskFullError` (the cause chained), and everything committed before it is kept.
        ``on_progress(done, total)`` is called once the scan has planned the images to process, and after
        each committed batch; ``label`` names the progress bar."""
        corpus = corpus.resolve()
        try:
            return self._run(corpus, progress=progress, skip=skip, on_progress=on_progress, select=select, label=label)
        except Exception as exc:
            full = disk_full_error(exc, doing=f"indexing {corpus} into {self.store.layout.root}", advice=INDEX_DISK_ADVICE, where=self.store.layout.root)
            if full is not None:
                raise full from exc
            raise

    def _run(self, corpus: Path, *, progress: bool, skip: tuple[Path, ...], on_progress: ProgressCallback | None, select: ImageSelector | None, label: str) -> IndexSummary:
        start = time.perf_counter()
        scan = scan_corpus(corpus, skip=skip)
        files = scan.files if select is None else [f for f in scan.files if select(f.path)]
        plan = plan_scan(files, self.store.known_images(str(corpus)), scan.issues)
        if select is not None:  # folder issues protect every shard's images from deletion; each is recorded once
            plan.issues = [issue for issue in plan.issues if select(Path(issue.path))]
        log.info("scan of %s: %d new, %d changed, %d unchanged, %d deleted", corpus, plan.new, plan.changed, plan.unchanged, len(plan.deleted))
        run_id = self.store.begin_run(str(corpus), self.models)
        counts = {"processed": 0, "regions_added": 0, "errors": 0, "removed": 0}
        try:
            counts["removed"] = self.store.delete_images(plan.deleted).images if plan.deleted else 0
            self._record_issues(run_id, plan.issues, counts)
            since_save, seen = 0, 0
            report = on_progress or (lambda done, total: None)
            report(0, len(plan.todo))
            batches = list(_chunks(plan.todo, self.batch_size))
            with tqdm(total=len(plan.todo), unit="img", desc=label, disable=not progress, dynamic_ncols=True) as bar:
                for batch, extracted in zip(batches, self.executor(self.extraction, batches)):
                    done = self._commit(run_id, extracted, counts)
                    since_save += done
                    seen += len(batch)
                    report(seen, len(plan.todo))
                    bar.update(len(batch))
                    bar.set_postfix(regions=counts["regions_added"], errors=counts["errors"])
                    if since_save >= self.save_every:
                        self.store.save_vectors()
                        since_save = 0
        except BaseException:
            self._end_run(run_id, "failed", plan.unchanged, start, counts, after_error=True)
            raise
        seconds = self._end_run(run_id, "completed", plan.unchanged, start, counts, after_error=False)
        return IndexSummary(unchanged=plan.unchanged, seconds=round(seconds, 3), **counts)

    def reindex(self, paths: list[Path], *, corpus: Path) -> IndexSummary:
        """Process exactly the image files ``paths`` again, as one run over ``corpus`` (whose
        ``annotations.jsonl`` ``--proposals gt`` reads): ``engine check --repair`` re-extracts the images
        whose feature rows were damaged on disk. Each image's new rows replace its old ones at the commit
        (the old rows become dead, like a changed file's); nothing else of the corpus is scanned."""
        start = time.perf_counter()
        entries = []
        for path in sorted(Path(p) for p in paths):
            st = path.stat()
            entries.append(FileEntry(path=path, size_bytes=st.st_size, mtime_ns=st.st_mtime_ns))
        run_id = self.store.begin_run(str(Path(corpus).resolve()), self.models)
        counts = {"processed": 0, "regions_added": 0, "errors": 0, "removed": 0}
        try:
            batches = list(_chunks(entries, self.batch_size))
            for extracted in self.executor(self.extraction, batches):
                self._commit(run_id, extracted, counts)
        except BaseException:
            self._end_run(run_id, "failed", 0, start, counts, after_error=True)
            raise
        seconds = self._end_run(run_id, "completed", 0, start, counts, after_error=False)
        return IndexSummary(unchanged=0, seconds=round(seconds, 3), **counts)

    def _end_run(self, run_id: int, status: str, unchanged: int, start: float, counts: dict[str, int], *, after_error: bool) -> float:
        """Save the FAISS files and close the run; returns its seconds. After an error, a failure
        here (the same full disk, most likely) is logged, not raised over the first error."""
        seconds = time.perf_counter() - start
        steps = (self.store.save_vectors, lambda: self.store.finish_run(run_id, status=status, unchanged=unchanged, seconds=seconds, **counts))
        for step in steps:
            try:
                step()
            except Exception as exc:
                if not after_error:
                    raise
                log.debug("could not close indexing run %d after the error: %s", run_id, exc, exc_info=True)
        return seconds

    def _record_issues(self, run_id: int, issues: list[ScanIssue], counts: dict[str, int]) -> None:
        """Record what the scan could not take (``engine info --errors`` lists it with the reason)."""
        for issue in issues:
            log.warning("skipping %s: %s", issue.path, issue.reason)
            self.store.record_error(run_id, None, issue.path, issue.reason)
            counts["errors"] += 1

    def _commit(self, run_id: int, extracted: ExtractedBatch, counts: dict[str, int]) -> int:
        """Record one extracted batch's failures and commit its images (one transaction); returns how many."""
        for failure in extracted.failures:
            self.store.record_error(run_id, failure.record, failure.path, failure.reason)
            counts["errors"] += 1
        if not extracted.items:
            return 0
        self.store.commit_images(run_id, extracted.items)
        counts["processed"] += len(extracted.items)
        counts["regions_added"] += extracted.regions
        return len(extracted.items)


def _chunks(items: list[FileEntry], size: int) -> Iterator[list[FileEntry]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
