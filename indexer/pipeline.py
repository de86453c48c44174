"""The indexing pipeline: scan a corpus, propose regions, extract their features, commit them image by image."""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from engine.diskspace import disk_full_error
from engine.errors import ImageReadError, InvalidInputError
from indexer.images import load_image
from indexer.proposal_sources import ProposalProvider
from indexer.region_features import RegionFeatureExtractor, image_vectors, mean_maps
from engine.models.ref_nms import RefNMSModel
from indexer.san_features import SanRegionEncoder
from indexer.concept_evidence import CONCEPT_LEVEL, ConceptEvidence
from indexer.catalog import RunCounts
from indexer.scan import FileEntry, ScanIssue, content_hash, plan_scan, scan_corpus
from indexer.store import CONCEPT_ARRAY, MAPS_ARRAY, POOLED_ARRAY, REFNMS_ARRAY, SAN_ARRAY, ImageRecord, IndexStore, RegionBatch

__all__ = ["IndexSummary", "IndexingPipeline", "INDEX_DISK_ADVICE", "ProgressCallback"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""``on_progress(done, total)``: images processed so far of those the run's scan planned to process."""

INDEX_DISK_ADVICE = "free space and re-run `engine index`, which resumes where it stopped (everything committed so far is kept)"


@dataclass(frozen=True)
class IndexSummary(RunCounts):
    """What one ``engine index`` run did (the counts its run records)."""

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass
class _Loaded:
    entry: FileEntry
    record: ImageRecord
    image: Image.Image
    boxes: np.ndarray
    objectness: np.ndarray


class IndexingPipeline:
    """Runs one indexing pass of ``corpus`` into an open, writable :class:`IndexStore`.

    Images are committed in batches of ``batch_size``; each image's regions become visible together
    with its metadata at the commit, so an interrupted run loses nothing committed and resumes.
    """

    def __init__(
        self,
        *,
        store: IndexStore,
        extractor: RegionFeatureExtractor,
        proposals: ProposalProvider,
        batch_size: int = 8,
        save_every: int = 2000,
        models: dict[str, str] | None = None,
        san: SanRegionEncoder | None = None,
        ref_nms: RefNMSModel | None = None,
        concepts: ConceptEvidence | None = None,
    ) -> None:
        if batch_size <= 0:
            raise InvalidInputError(f"--batch-size must be a positive integer, got {batch_size}")
        self.store = store
        self.extractor = extractor
        self.proposals = proposals
        self.batch_size = batch_size
        self.save_every = save_every
        self.models = models or {}
        self.san = san
        self.ref_nms = ref_nms  # computes the stored Ref-NMS visual features (array ``refnms``)
        self.concepts = concepts  # each region's ImageNet class evidence (array ``concepts``)

    def run(self, corpus: Path, *, progress: bool = True, skip: tuple[Path, ...] = (), on_progress: ProgressCallback | None = None) -> IndexSummary:
        """Index ``corpus``; a full disk is one :class:`DiskFullError` (the cause chained), and
        everything committed before it is kept. ``on_progress(done, total)`` is called once the scan
        has planned the images to process, and after each committed batch."""
        corpus = corpus.resolve()
        try:
            return self._run(corpus, progress=progress, skip=skip, on_progress=on_progress)
        except Exception as exc:
            full = disk_full_error(exc, doing=f"indexing {corpus} into {self.store.layout.root}", advice=INDEX_DISK_ADVICE, where=self.store.layout.root)
            if full is not None:
                raise full from exc
            raise

    def _run(self, corpus: Path, *, progress: bool, skip: tuple[Path, ...], on_progress: ProgressCallback | None = None) -> IndexSummary:
        start = time.perf_counter()
        scan = scan_corpus(corpus, skip=skip)
        plan = plan_scan(scan.files, self.store.known_images(str(corpus)), scan.issues)
        log.info("scan of %s: %d new, %d changed, %d unchanged, %d deleted", corpus, plan.new, plan.changed, plan.unchanged, len(plan.deleted))
        run_id = self.store.begin_run(str(corpus), self.models)
        counts = {"processed": 0, "regions_added": 0, "errors": 0, "removed": 0}
        try:
            counts["removed"] = self.store.delete_images(plan.deleted).images if plan.deleted else 0
            self._record_issues(run_id, plan.issues, counts)
            since_save, seen = 0, 0
            report = on_progress or (lambda done, total: None)
            report(0, len(plan.todo))
            with tqdm(total=len(plan.todo), unit="img", desc="indexing", disable=not progress, dynamic_ncols=True) as bar:
                for batch in _chunks(plan.todo, self.batch_size):
                    done = self._process_batch(run_id, batch, counts)
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
            for batch in _chunks(entries, self.batch_size):
                self._process_batch(run_id, batch, counts)
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

    def _process_batch(self, run_id: int, batch: list[FileEntry], counts: dict[str, int]) -> int:
        loaded: list[_Loaded] = []
        for entry in batch:
            try:
                loaded.append(self._load(entry))
            except ImageReadError as exc:
                log.warning("skipping %s", exc)
                self.store.record_error(run_id, _record_or_none(entry), str(entry.path), str(exc))
                counts["errors"] += 1
        if not loaded:
            return 0
        items: list[tuple[ImageRecord, RegionBatch]] = []
        for group in _same_size_groups(loaded):
            features = self._features(group)
            for it, (maps, vectors, san, image_vector, concepts) in zip(group, features):
                arrays = {"visual": vectors}
                if concepts is not None:
                    arrays[CONCEPT_ARRAY] = concepts
                if self.store.has_array(MAPS_ARRAY):
                    arrays[MAPS_ARRAY] = maps
                if self.store.has_array(POOLED_ARRAY):
                    arrays[POOLED_ARRAY] = mean_maps(maps)
                if self.ref_nms is not None:
                    arrays[REFNMS_ARRAY] = self.ref_nms.visual_features(maps)
                if san is not None:
                    arrays[SAN_ARRAY] = san
                items.append((replace(it.record, vector=image_vector), RegionBatch(boxes=it.boxes, objectness=it.objectness, source=self.proposals.source, arrays=arrays)))
        items.sort(key=lambda pair: pair[0].path)
        self.store.commit_images(run_id, items)
        counts["processed"] += len(items)
        counts["regions_added"] += sum(len(b.boxes) for _, b in items)
        return len(items)

    def _features(self, group: list[_Loaded]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]]:
        """Region maps, vectors (the visual key), SAN vectors (``None`` without SAN), the image vector
        (mean backbone feature of the maps' level ``c4``, CM-Att's ``e_0``) and the class evidence (``None``
        without the ``concepts`` array) of one same-size group. A batch
        proposal network (the RPN) runs the backbone once (``c3``..``c5``) and proposes from its maps;
        everything else, the key's levels included, is pooled from the same maps."""
        images = [it.image for it in group]
        propose_batch = getattr(self.proposals, "propose_batch", None)
        if propose_batch is not None:
            maps, proposals = propose_batch(images)
            for it, (boxes, objectness) in zip(group, proposals):
                it.boxes, it.objectness = np.asarray(boxes, np.float32), np.asarray(objectness, np.float32)
            missing = {*self.extractor.levels, *((CONCEPT_LEVEL,) if self.concepts is not None else ())} - set(maps)
            if missing:  # a proposal network on fewer levels than the key reads (not the shipped RPN)
                maps = {**maps, **self._backbone_maps(images, levels=missing)}
        else:
            maps = self._backbone_maps(images)
        sizes = [im.size for im in images]
        boxes = [it.boxes for it in group]
        level = self.extractor.config.level
        vectors = image_vectors(maps[level])
        features = self.extractor.from_feature_map(maps, sizes, boxes)
        san = self.san.encode(maps, sizes, boxes, [m for m, _ in features]) if self.san is not None else [None] * len(features)
        concepts = self.concepts.evidence(maps, sizes, boxes) if self.concepts is not None else [None] * len(features)
        return [(m, v, s, e, c) for (m, v), s, e, c in zip(features, san, vectors, concepts)]

    def _backbone_maps(self, images: list[Image.Image], levels: set[str] | None = None) -> dict:
        """The backbone levels the region features and key (and SAN's saliency network, when indexing SAN)
        need, in one pass (``levels``: only those)."""
        import torch

        from indexer.backbone import preprocess
        from indexer.san_features import SALIENCY_LEVELS

        backbone = self.extractor.backbone
        batch, _ = preprocess(images, max_size=backbone.max_size)
        if levels is None:
            levels = {*self.extractor.levels, *(SALIENCY_LEVELS if self.san is not None else ()), *((CONCEPT_LEVEL,) if self.concepts is not None else ())}
        with torch.no_grad():
            return backbone(batch.to(backbone.device), levels=sorted(levels))

    def _load(self, entry: FileEntry) -> _Loaded:
        try:
            digest = content_hash(entry.path)
        except OSError as exc:
            raise ImageReadError(f"cannot read image {entry.path}: {exc.strerror or exc}") from None
        image = load_image(entry.path)
        w, h = image.size
        record = ImageRecord(path=str(entry.path), content_hash=digest, size_bytes=entry.size_bytes, mtime_ns=entry.mtime_ns, width=w, height=h)
        if hasattr(self.proposals, "propose_batch"):  # proposed per batch, from the backbone's maps
            boxes, objectness = np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        else:
            boxes, objectness = self.proposals(entry.path, image)
        return _Loaded(entry=entry, record=record, image=image, boxes=np.asarray(boxes, np.float32), objectness=np.asarray(objectness, np.float32))


def _record_or_none(entry: FileEntry) -> ImageRecord | None:
    """A record for an unreadable file, so that an unchanged broken file is not retried on every run."""
    try:
        digest = content_hash(entry.path)
    except OSError:
        return None
    return ImageRecord(path=str(entry.path), content_hash=digest, size_bytes=entry.size_bytes, mtime_ns=entry.mtime_ns, width=0, height=0)


def _same_size_groups(items: list[_Loaded]) -> Iterator[list[_Loaded]]:
    """Batch only images of the same size: padding to a common size would change features near the borders,
    and a query image (processed alone) must get the same features as at index time."""
    groups: dict[tuple[int, int], list[_Loaded]] = defaultdict(list)
    for it in items:
        groups[it.image.size].append(it)
    yield from groups.values()


def _chunks(items: list[FileEntry], size: int) -> Iterator[list[FileEntry]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
