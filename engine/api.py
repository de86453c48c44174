"""The Python face of the engine: ``Engine(index_dir).index(corpus)`` and ``.search(...)``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from engine.boxes import Box
from engine.config import EngineConfig, IndexConfig, default_index_dir
from engine.errors import IndexVersionError, InvalidInputError
from engine.results import Hit

__all__ = ["Engine"]

log = logging.getLogger(__name__)


class Engine:
    """A region retrieval engine over one index directory.

    Models load lazily on first use and are kept for later calls; the index is opened read-only for
    searching and with the writer lock for indexing.

    Example::

        engine = Engine("my-index")
        engine.index("corpus/")
        hits = engine.search(image="q.jpg", region=(40, 60, 200, 220), k=5)
    """

    def __init__(self, index_dir: Path | str | None = None, *, config: EngineConfig | None = None) -> None:
        self.index_dir = Path(index_dir) if index_dir is not None else default_index_dir()
        self.config = config or EngineConfig()
        self._extractor: Any = None
        self._reader: Any = None
        self._retrieval_model: Any = None
        self._san_encoder: Any = None

    # -- models -------------------------------------------------------------------------------
    @property
    def extractor(self):  # -> RegionFeatureExtractor
        if self._extractor is None:
            from engine.device import resolve_device
            from indexer.backbone import create_backbone
            from indexer.region_features import RegionFeatureExtractor

            device = resolve_device(self.config.device)
            backbone = create_backbone(self.config.backbone, device=device)
            self._extractor = RegionFeatureExtractor(backbone=backbone, config=self.config.features)
        return self._extractor

    def _models(self) -> dict[str, str]:
        return {"backbone": self.extractor.backbone.version, "region_features": self.extractor.version}

    def _array_shapes(self, *, san: bool | None = None) -> dict[str, tuple[int, ...]]:
        c, h, w = self.extractor.map_shape
        shapes: dict[str, tuple[int, ...]] = {"maps": (c, h, w), "visual": (c,)}
        if self.config.san if san is None else san:
            shapes["san"] = (self.san_encoder.dim,)
        return shapes

    @property
    def san_encoder(self):  # -> indexer.san_features.SanRegionEncoder
        """SAN's region encoder (saliency network + SAN), loaded once from the configured or shipped checkpoints."""
        if self._san_encoder is None:
            from engine.models.saliency import SaliencyNet
            from engine.models.san import SANModel
            from indexer.san_features import SanRegionEncoder

            backbone = self.extractor.backbone
            saliency = SaliencyNet.from_checkpoint(self.config.saliency_checkpoint, device=backbone.device)
            saliency.check_backbone(backbone.version, backbone.max_size)
            model = SANModel.from_checkpoint(self.config.san_checkpoint)
            model.check_saliency(saliency)
            self._san_encoder = SanRegionEncoder(backbone=backbone, saliency=saliency, model=model)
        return self._san_encoder

    # -- indexing -----------------------------------------------------------------------------
    def index(self, corpus: Path | str, *, config: IndexConfig | None = None, progress: bool = False):
        """Index (or update the index of) every image under ``corpus``; returns an ``IndexSummary``."""
        from indexer.pipeline import IndexingPipeline
        from indexer.proposal_sources import create_proposal_provider
        from indexer.store import IndexStore

        config = config or IndexConfig()
        corpus = Path(corpus)
        if not corpus.is_dir():
            raise InvalidInputError(f"corpus folder {corpus} does not exist or is not a folder; pass a folder of images")
        proposals = create_proposal_provider(config.proposals, corpus.resolve(), backbone=self.extractor.backbone)
        self._close_reader()
        with IndexStore.open(self.index_dir, create=True, writable=True, config=self.config.store, array_shapes=self._index_shapes()) as store:
            san = self.san_encoder if store.has_array("san") else None
            models = {**self._models(), "proposals": getattr(proposals, "version", proposals.source)}
            if san is not None:
                models["san"] = san.version
            pipeline = IndexingPipeline(store=store, extractor=self.extractor, proposals=proposals, batch_size=config.batch_size, save_every=config.save_every, models=models, san=san)
            return pipeline.run(corpus, progress=progress, skip=(self.index_dir,))

    def _index_shapes(self) -> dict[str, tuple[int, ...]]:
        """The arrays to index: with SAN for a new index (when configured); an existing index keeps
        its arrays (one built without SAN stays without it, with a warning: text-only search then
        needs a re-index into a new directory)."""
        from indexer.index_dir import IndexLayout
        from indexer.store import IndexStore

        if not IndexLayout(self.index_dir.expanduser().resolve()).exists():
            return self._array_shapes()
        with IndexStore.open(self.index_dir, config=self.config.store) as existing:
            stored = {name: spec.shape for name, spec in existing.array_specs.items()}
        if "san" in stored:  # its rows must be written (IndexStore.open reports any other mismatch)
            return self._array_shapes(san=True)
        if self.config.san:
            log.warning("index %s was built without SAN embeddings: text-only queries need a re-index into a new directory", self.index_dir)
        return self._array_shapes(san=False)

    # -- searching ----------------------------------------------------------------------------
    def search(
        self,
        *,
        image: Path | str | None = None,
        region: Box | list[float] | None = None,
        text: str | None = None,
        k: int = 10,
        exclude_self: bool = False,
    ) -> list[Hit]:
        """The ``k`` indexed regions that show the same thing as ``region`` of ``image``.

        ``region`` defaults to the whole image. With ``text``, stage 1 shortlists ``config.shortlist``
        candidates by visual similarity, joined by the text's top ``config.san_candidates`` SAN
        matches, and stage 2 reranks them by ``grn + config.text_weight · san``: the GRN similarity
        (the text gates the query region and every candidate) plus SAN's score of how well each
        candidate fits the text (the GRN alone when the index holds no SAN vectors). With ``text`` alone (no image), SAN's text vector searches the index's SAN
        embeddings and the full SAN (saliency-guided textual attention per candidate) reranks them. ``exclude_self`` drops hits from the query image itself
        (matched by content hash).
        """
        from query.encode import VisualQueryEncoder, load_query_region
        from query.rerank import FusedRescorer, GrnRescorer, SanRescorer
        from query.search import SearchOptions, search_regions

        if text is not None and not text.strip():
            raise InvalidInputError("--text is empty; describe the region in words, e.g. --text \"a red circle left of a blue square\"")
        if image is None:
            if text is None:
                raise InvalidInputError("a query needs an image or a text: pass --image FILE (and optionally --region x1,y1,x2,y2) and/or --text \"...\"")
            if region is not None:
                raise InvalidInputError("--region needs --image: the region is a box in that image")
            return self._search_text(text, k)
        SearchOptions(k=k, shortlist=self.config.shortlist)  # validates before any model loads
        store = self._open_reader()
        query = load_query_region(image, region)
        query_map, vector = VisualQueryEncoder(self.extractor).encode(query)
        options = SearchOptions(k=k, exclude_self_hash=query.content_hash if exclude_self else None, shortlist=self.config.shortlist)
        rescore = None
        extra: list[int] = []
        if text is not None:
            model = self.retrieval_model
            model.encode_text(text)  # unknown-only or empty text fails here, before any scoring
            rescore = GrnRescorer(store=store, model=model, query_map=query_map, text=text)
            san_vector = self._san_text_vector(store, text)
            extra = self._san_candidates(store, san_vector) if san_vector is not None else []
            if san_vector is not None and self.config.text_weight > 0:
                rescore = FusedRescorer(rescore, SanRescorer(store=store, model=self.san_encoder.model, text=text), text_weight=self.config.text_weight)
        return search_regions(store, vector, options, rescore, extra_ids=extra)

    def _check_san_index(self, store) -> None:  # noqa: ANN001
        """A clear error when the index holds no SAN embeddings, or ones of another SAN model."""
        if not store.has_array("san"):
            raise IndexVersionError(
                f"index {self.index_dir} was built without SAN embeddings, which text-only search needs; "
                f"re-index the corpus into a new directory: engine index CORPUS --index NEWDIR"
            )
        indexed = store.info().models.get("san")
        if indexed and indexed != self.san_encoder.version:
            raise IndexVersionError(
                f"index {self.index_dir} holds SAN embeddings of {indexed}, but this engine loads {self.san_encoder.version}; "
                f"re-index the corpus into a new directory (engine index CORPUS --index NEWDIR) or configure the SAN checkpoint it was built with"
            )

    def _search_text(self, text: str, k: int) -> list[Hit]:
        """Text-only search: SAN's ``t_g`` searches the ``san`` FAISS file (stage 1), the full STA reranks."""
        from query.rerank import SanRescorer
        from query.search import SearchOptions, search_regions

        options = SearchOptions(k=k, shortlist=self.config.shortlist)
        store = self._open_reader()
        self._check_san_index(store)
        model = self.san_encoder.model
        vector = model.text_vector(text)
        return search_regions(store, vector, options, SanRescorer(store=store, model=model, text=text), array="san", stage1="san_text")

    def _san_text_vector(self, store, text: str):  # noqa: ANN001, ANN202
        """SAN's text vector when SAN can serve a combined query (the engine uses SAN, the index holds
        this SAN model's embeddings, SAN knows a word of the text); ``None`` and the GRN works alone."""
        if not self.config.san or not store.has_array("san"):
            return None
        try:
            self._check_san_index(store)
            return self.san_encoder.model.text_vector(text)
        except (IndexVersionError, InvalidInputError) as exc:
            log.info("SAN does not serve this query: %s", exc)
            return None

    def _san_candidates(self, store, vector) -> list[int]:  # noqa: ANN001
        """Region ids of the SAN text ``vector``'s top matches (they join stage 1's shortlist)."""
        if self.config.san_candidates <= 0:
            return []
        _, ids = store.search(vector[None], self.config.san_candidates, array="san")
        return [int(i) for i in ids[0] if i >= 0]

    @property
    def retrieval_model(self):  # -> RegionRetrievalModel
        """The text-gated reranker (GRN), loaded once from ``config.grn_checkpoint`` or the shipped default."""
        if self._retrieval_model is None:
            from engine.device import resolve_device
            from engine.models.retrieval import RegionRetrievalModel

            self._retrieval_model = RegionRetrievalModel.from_checkpoint(self.config.grn_checkpoint, device=resolve_device(self.config.device))
        return self._retrieval_model

    def render(
        self,
        hits: list[Hit],
        *,
        image: Path | str | None = None,
        region: Box | list[float] | None = None,
        text: str | None = None,
        out_dir: Path | str,
    ) -> list[Path]:
        """Draw the query (its region, or a card with its text) and each hit's box into ``out_dir``.

        Writes ``query.png``, ``hit_NN.png`` and ``contact_sheet.png``; a query needs an image or a text.
        """
        from query.encode import load_query_region
        from query.render import render_results

        if image is None:
            if region is not None:
                raise InvalidInputError("a region needs an image: the region is a box in that image")
            if text is None or not text.strip():
                raise InvalidInputError("nothing to draw: give the query image or the query text")
            return render_results(None, None, hits, Path(out_dir), text=text.strip())
        query = load_query_region(image, region)
        return render_results(query.image, query.box, hits, Path(out_dir), text=text)

    # -- inspection ---------------------------------------------------------------------------
    def info(self):
        """Counts, index type, device and models of the index (an ``IndexInfo``)."""
        return self._open_reader().info()

    def errors(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every image that could not be indexed."""
        return self._open_reader().errors()

    def close(self) -> None:
        self._close_reader()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_reader(self):
        from indexer.store import IndexStore

        if self._reader is None:
            self._reader = IndexStore.open(self.index_dir, config=self.config.store)
        return self._reader

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
