"""The Python face of the engine: ``Engine(index_dir).index(corpus)`` and ``.search(...)``."""
from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.boxes import Box
from engine.config import EngineConfig, IndexConfig, default_index_dir
from engine.errors import EngineError, IndexNotFoundError, IndexVersionError, InvalidInputError, UnknownIdError
from engine.results import Hit
from query.filters import HitFilter
from query.request import SearchRequest

if TYPE_CHECKING:  # named for the types only (these modules import torch, faiss or the models)
    from indexer.integrity import ReindexJob
    from engine.sharded_index import ShardedIndex
    from indexer.pipeline import BatchExecutor, ImageSelector, IndexingPipeline, ProgressCallback
    from indexer.proposal_sources import ProposalProvider
    from indexer.store import IndexStore
    from query.encode import EncodedQuery

__all__ = ["Engine", "SearchRequest"]

log = logging.getLogger(__name__)

_NOT_LOADED = object()  # a model slot not loaded yet (None is a loaded "configured off")


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
        self._grounding: Any = None
        self._ref_nms: Any = None
        self._pipeline: Any = None
        self._concept_evidence: Any = None
        self._concept_vocabulary: Any = None
        self._minilm_words: Any = None
        self._text_projection: Any = _NOT_LOADED
        self._instance_head: Any = _NOT_LOADED
        self._vocabulary_grounder: Any = None
        self._sharded: ShardedIndex | None = None

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

    @property
    def visual_key(self) -> str:
        """The visual key version this engine's configuration builds (recorded with, and checked against, an index)."""
        from indexer.component_configs import visual_key_version

        return visual_key_version(self.config.backbone, self.config.features)

    def _models(self) -> dict[str, str]:
        return {"backbone": self.extractor.backbone.version, "region_features": self.extractor.version}

    def _array_shapes(self, *, san: bool | None = None, pooled: bool = True, maps: bool = True, refnms: bool | None = None, concepts: bool | None = None, instance: bool | None = None) -> dict[str, tuple[int, ...]]:
        from indexer.concept_evidence import CONCEPT_SHAPE
        from indexer.store import CONCEPT_ARRAY, INSTANCE_ARRAY, MAPS_ARRAY, POOLED_ARRAY, REFNMS_ARRAY

        c, h, w = self.extractor.map_shape
        shapes: dict[str, tuple[int, ...]] = {"visual": (self.extractor.dim,)}
        if maps:
            shapes[MAPS_ARRAY] = (c, h, w)
        if pooled:
            shapes[POOLED_ARRAY] = (c,)
        if self.config.san if san is None else san:
            shapes["san"] = (self.san_encoder.dim,)
        if self.config.stage3 if refnms is None else refnms:
            shapes[REFNMS_ARRAY] = (self.ref_nms_model.config.dim,)
        if self.config.concepts if concepts is None else concepts:
            shapes[CONCEPT_ARRAY] = CONCEPT_SHAPE
        if maps and ((self.config.instance_head is not None and self.config.instance_weight > 0) if instance is None else instance):  # the head reads the stored maps
            shapes[INSTANCE_ARRAY] = (self._required_instance_head().config.out_dim,)
        return shapes

    @property
    def concept_evidence(self):  # -> indexer.concept_evidence.ConceptEvidence
        """Each region's ImageNet class evidence from the backbone's own classifier (array ``concepts``)."""
        if self._concept_evidence is None:
            from indexer.concept_evidence import ConceptEvidence

            self._concept_evidence = ConceptEvidence(backbone=self.extractor.backbone)
        return self._concept_evidence

    @property
    def concept_vocabulary(self):  # -> engine.models.concepts.ConceptVocabulary
        """The open vocabulary: all-MiniLM-L6-v2 and the shipped concept table, loaded once."""
        if self._concept_vocabulary is None:
            from engine.models.concepts import ConceptVocabulary

            self._concept_vocabulary = ConceptVocabulary(encoder=self.minilm_words)
        return self._concept_vocabulary

    @property
    def minilm_words(self):  # -> engine.models.word_features.MiniLMWords
        """all-MiniLM-L6-v2, loaded once and shared: the open vocabulary's sentence vectors and the MiniLM SAN's
        word features come from one cached pass over each text."""
        if self._minilm_words is None:
            from engine.device import resolve_device
            from engine.models.word_features import MiniLMWords

            self._minilm_words = MiniLMWords(device=resolve_device(self.config.device))
        return self._minilm_words

    @property
    def text_projection(self):  # -> engine.models.text_projection.TextProjection | None
        """The map from English into this engine's visual key space (``config.text_projection``; ``None`` when
        configured off), loaded once and checked to be trained for this key."""
        if self._text_projection is _NOT_LOADED:
            self._text_projection = self._keyed_model(self.config.text_projection, "text-projection")
        return self._text_projection

    @property
    def instance_head(self):  # -> engine.models.instance_head.InstanceHead | None
        """Stage 2's instance embedding of region-only queries (``config.instance_head``; ``None`` when
        configured off), loaded once and checked to be trained for this visual key."""
        if self._instance_head is _NOT_LOADED:
            self._instance_head = self._keyed_model(self.config.instance_head, "instance-head")
        return self._instance_head

    def _keyed_model(self, spec: Path | str | None, family: str):  # noqa: ANN202
        """A model of ``family`` that reads this engine's visual key (the text projection, the instance head),
        loaded from ``spec`` (``None``: none) and checked to be trained for this key."""
        if spec is None:
            return None
        from engine.device import resolve_device
        from engine.models.registry import load_model

        model = load_model(spec, device=resolve_device(self.config.device), family=family)
        model.check_key(f"{self.config.backbone.name}:{self.config.features.key_version}", source=f"{family.replace('-', ' ')} {str(spec)!r}")
        return model

    @property
    def ref_nms_model(self):  # -> engine.models.ref_nms.RefNMSModel
        """Stage 3's Ref-NMS model, loaded once from ``config.ref_nms_checkpoint`` (``None``: the shipped
        ``ref-nms-r``); indexing stores its text-independent visual features."""
        if self._ref_nms is None:
            from engine.device import resolve_device
            from engine.models.registry import load_model

            self._ref_nms = load_model(self.config.ref_nms_checkpoint, device=resolve_device(self.config.device), family="ref-nms")
        return self._ref_nms

    @property
    def san_encoder(self):  # -> indexer.san_features.SanRegionEncoder
        """SAN's region encoder (saliency network + SAN), loaded once from the configured or shipped checkpoints."""
        if self._san_encoder is None:
            from engine.models.registry import load_model
            from indexer.san_features import SanRegionEncoder

            backbone = self.extractor.backbone
            saliency = load_model(self.config.saliency_checkpoint, device=backbone.device, family="saliency")
            saliency.check_backbone(backbone.version, backbone.max_size)
            model = load_model(self.config.san_checkpoint, device=backbone.device, family="san")
            model.check_saliency(saliency)
            model.share_words(self.minilm_words)
            self._san_encoder = SanRegionEncoder(backbone=backbone, saliency=saliency, model=model)
        return self._san_encoder

    def vocabulary_grounder(self):  # -> query.vocabulary_grounding.VocabularyGrounder
        """Grounds any English phrase among an image's RPN proposals by the open vocabulary (``engine ground
        --method vocabulary``, ``--explain``), scoring them as text-only search scores regions; made once."""
        if self._vocabulary_grounder is None:
            from indexer.proposal_sources import RpnProposals
            from query.vocabulary_grounding import VocabularyGrounder

            self._vocabulary_grounder = VocabularyGrounder(
                extractor=self.extractor,
                proposals=RpnProposals.load(backbone=self.extractor.backbone),
                evidence=self.concept_evidence,
                vocabulary=self.concept_vocabulary,
                projection=self.text_projection,
                projection_weight=self.config.projection_weight,
                proposal_weight=self.config.proposal_weight,
            )
        return self._vocabulary_grounder

    # -- indexing -----------------------------------------------------------------------------
    def index(self, corpus: Path | str, *, config: IndexConfig | None = None, progress: bool = False, on_progress: ProgressCallback | None = None):
        """Index (or update the index of) every image under ``corpus``; returns an ``IndexSummary``.

        ``on_progress(done, total)`` hears how many of the images to process are done (after each commit).
        ``config.shards`` makes a new sharded index (``indexer/shards.py``); an existing sharded index is
        indexed shard by shard, each image into the shard it hashes to. ``config.ray`` spreads the backbone
        and embedding work over Ray workers (``engine/distributed/ray_indexing.py``)."""
        from indexer.index_dir import IndexLayout
        from indexer.shards import ShardLayout

        config = config or IndexConfig()
        corpus = Path(corpus)
        if not corpus.is_dir():
            raise InvalidInputError(f"corpus folder {corpus} does not exist or is not a folder; pass a folder of images")
        sharded = self.sharded
        if sharded is None and config.shards is not None:
            if IndexLayout(self.index_dir.expanduser().resolve()).exists():
                raise InvalidInputError(f"index {self.index_dir} is not sharded; --shards creates a new sharded index: give a new --index directory")
            ShardLayout.create(self.index_dir, config.shards)
            sharded = self.sharded
        if sharded is not None:
            return sharded.index(corpus, config, progress=progress, on_progress=on_progress)
        return self.index_into(self.index_dir, corpus, config, progress=progress, on_progress=on_progress)

    def index_into(self, index_dir: Path, corpus: Path, config: IndexConfig, *, progress: bool = False, on_progress: ProgressCallback | None = None, select: ImageSelector | None = None, label: str = "indexing"):
        """Index the images of ``corpus`` (those ``select`` accepts) into the ordinary index at ``index_dir``
        (this engine's, or one shard of it); returns the run's ``IndexSummary``."""
        from indexer.proposal_sources import create_proposal_provider
        from indexer.store import IndexStore

        proposals = create_proposal_provider(config.proposals, corpus.resolve(), backbone=self.extractor.backbone)
        self._close_reader()
        with IndexStore.open(index_dir, create=True, writable=True, config=self.config.store, array_shapes=self._index_shapes(index_dir, maps=config.maps), visual_key=self.visual_key) as store:
            executor = None
            if config.ray:
                from engine.distributed.ray_indexing import RayExecutor

                executor = RayExecutor.start(config.ray, engine_config=self.config, proposals=config.proposals, corpus=corpus.resolve(), arrays=tuple(store.array_specs), workers=config.ray_workers)
            try:
                pipeline = self._indexing_pipeline(store, proposals, config, executor)
                return pipeline.run(corpus, progress=progress, skip=(self.index_dir.expanduser().resolve(), Path(index_dir).expanduser().resolve()), on_progress=on_progress, select=select, label=label)
            finally:
                if executor is not None:
                    executor.close()

    @property
    def sharded(self) -> ShardedIndex | None:
        """The sharded index at :attr:`index_dir` (``None``: an ordinary one, or none yet)."""
        if self._sharded is None:
            from engine.sharded_index import ShardedIndex
            from indexer.shards import ShardLayout

            layout = ShardLayout.read(self.index_dir)
            if layout is None:
                return None
            self._sharded = ShardedIndex(layout, self)
        return self._sharded

    def _indexing_pipeline(self, store: IndexStore, proposals: ProposalProvider, config: IndexConfig, executor: BatchExecutor | None = None) -> IndexingPipeline:
        """The indexing pipeline of this engine's models into the open, writable ``store``: SAN and the
        Ref-NMS features when the index has those arrays; ``models`` records every version. ``executor``
        runs the extraction elsewhere (Ray workers); by default here."""
        from indexer.pipeline import IndexingPipeline, run_here

        extraction = self.batch_extraction(store.array_specs, proposals, ref_nms=self._indexing_ref_nms(store), instance=self._indexing_instance_head(store))
        models = {**self._models(), "proposals": getattr(proposals, "version", proposals.source)}
        models.update({k: m.version for k, m in (("san", extraction.san), ("ref_nms", extraction.ref_nms), ("concepts", extraction.concepts), ("instance_head", extraction.instance)) if m is not None})
        return IndexingPipeline(store=store, extraction=extraction, batch_size=config.batch_size, save_every=config.save_every, models=models, executor=executor or run_here)

    def batch_extraction(self, arrays: Collection[str], proposals: ProposalProvider, *, ref_nms=None, instance=None):  # noqa: ANN001
        """The compute half of indexing (:class:`indexer.extraction.BatchExtraction`) for an index holding the
        arrays named ``arrays``, with this engine's models (a Ray worker builds its own this way).
        ``ref_nms`` / ``instance``: the models whose outputs the ``refnms`` / ``instance`` arrays store
        (default this engine's)."""
        from indexer.extraction import BatchExtraction
        from indexer.store import CONCEPT_ARRAY, INSTANCE_ARRAY, MAPS_ARRAY, POOLED_ARRAY, REFNMS_ARRAY, SAN_ARRAY

        return BatchExtraction(
            extractor=self.extractor,
            proposals=proposals,
            maps=MAPS_ARRAY in arrays,
            pooled=POOLED_ARRAY in arrays,
            san=self.san_encoder if SAN_ARRAY in arrays else None,
            ref_nms=(ref_nms or self.ref_nms_model) if REFNMS_ARRAY in arrays else None,
            concepts=self.concept_evidence if CONCEPT_ARRAY in arrays else None,
            instance=(instance or self._required_instance_head()) if INSTANCE_ARRAY in arrays else None,
        )

    def _required_instance_head(self):  # noqa: ANN202
        """This engine's instance head, for an index that stores its embeddings; a clear error when it has none."""
        head = self.instance_head
        if head is None:
            raise IndexVersionError("this index stores instance-head embeddings (array 'instance'), but this engine has no instance head (instance_head=None); configure the head it was built with, or index into a new directory")
        return head

    def _indexing_instance_head(self, store):  # noqa: ANN001, ANN202
        """The instance head whose embeddings an index with the ``instance`` array stores (``None``: no such array)."""
        from indexer.store import INSTANCE_ARRAY

        if not store.has_array(INSTANCE_ARRAY):
            return None
        return _same_model(store, "instance_head", self._required_instance_head(), "instance embeddings", "instance head")

    def _indexing_ref_nms(self, store):  # noqa: ANN001, ANN202
        """The Ref-NMS model whose visual features an index with the ``refnms`` array stores (``None``: no such array)."""
        from indexer.store import REFNMS_ARRAY

        if not store.has_array(REFNMS_ARRAY):
            return None
        return _same_model(store, "ref_nms", self.ref_nms_model, "Ref-NMS features", "Ref-NMS checkpoint")

    def _index_shapes(self, index_dir: Path, *, maps: bool = True) -> dict[str, tuple[int, ...]]:
        """The arrays to index: with SAN for a new index (when configured) and the 7×7 maps unless
        ``maps`` is False; an existing index keeps its arrays (one built without SAN stays without it,
        with a warning: text-only search then needs a re-index into a new directory)."""
        from indexer.store import CONCEPT_ARRAY, INSTANCE_ARRAY, MAPS_ARRAY, POOLED_ARRAY, REFNMS_ARRAY, IndexStore

        try:
            with IndexStore.open(index_dir, config=self.config.store, visual_key=self.visual_key) as existing:
                stored = {name: spec.shape for name, spec in existing.array_specs.items()}
        except IndexNotFoundError:  # none yet, or a creation a killed run left unfinished: a new index
            return self._array_shapes(maps=maps)
        pooled = POOLED_ARRAY in stored  # an index from before the pooled array keeps reading maps in stage 2
        has_maps = MAPS_ARRAY in stored
        if has_maps != maps:
            log.warning("index %s was created %s the 7x7 maps and keeps it that way (a new directory can be built %s)", index_dir, "with" if has_maps else "without", "--no-maps" if has_maps else "with maps")
        refnms = REFNMS_ARRAY in stored  # an index from before it computes Ref-NMS's visual half at query time
        concepts = CONCEPT_ARRAY in stored  # an index from before the open vocabulary keeps the first-wave text path
        instance = INSTANCE_ARRAY in stored  # an index from before it runs the instance head on the stored maps at query time
        if "san" in stored:  # its rows must be written (IndexStore.open reports any other mismatch)
            return self._array_shapes(san=True, pooled=pooled, maps=has_maps, refnms=refnms, concepts=concepts, instance=instance)
        if self.config.san:
            log.warning("index %s was built without SAN embeddings: text-only queries need a re-index into a new directory", index_dir)
        return self._array_shapes(san=False, pooled=pooled, maps=has_maps, refnms=refnms, concepts=concepts, instance=instance)

    # -- searching ----------------------------------------------------------------------------
    def search(
        self,
        *,
        image: Path | str | None = None,
        region: Box | list[float] | None = None,
        text: str | None = None,
        k: int = 10,
        exclude_self: bool = False,
        region_id: int | None = None,
        filters: HitFilter | None = None,
    ) -> list[Hit]:
        """The ``k`` indexed regions that show the same thing as ``region`` of ``image``.

        ``region`` defaults to the whole image; ``region_id`` instead queries with an indexed region
        (its stored features: "more like this hit"). Any English ``text`` goes through the open visual
        vocabulary (``query/concept_search.py``, docs/open-vocabulary.md): with a region, the region-only
        ranking plus ``config.concept_weight · gate · ConSE``, the gate being how well the text fits the
        query region; alone, ConSE over every region and the text projection's FAISS matches (``config.projection_weight``). A text whose content words the first-wave models
        all know, and that SAN relates to the query region (``config.san_gate``), is read by them
        instead, as follows. With such a ``text``, stage 1 shortlists
        ``config.shortlist`` candidates by visual similarity, joined by the text's top
        ``config.san_candidates`` SAN matches, and stage 2 reranks them by
        ``config.image_weight · grn + config.text_weight · san``: the GRN similarity (the text gates
        the query region and every candidate) plus SAN's score of how well each candidate fits the
        text (the GRN alone when the index holds no SAN vectors). Stage 3 (with ``config.stage3``)
        then grounds the text in the best images with Ref-NMS and CM-Att and returns their grounded
        regions first, scored ``stage2 + w_r · relatedness + w_g · grounding``
        (``query/localize.py``). With such a ``text`` alone (no image), SAN's text vector searches the
        index's SAN embeddings and the full SAN (saliency-guided textual attention per candidate)
        reranks them. ``exclude_self`` drops hits from the query image itself (matched by content
        hash); ``filters`` (:class:`query.filters.HitFilter`) restrict the hits. The hits come from
        distinct images by default (each image's best box); ``filters=HitFilter(max_per_image=N)``
        allows ``N`` boxes of one image (``0``: any number). Every query runs through
        :attr:`pipeline` (``query/pipeline.py``, ``docs/query-pipeline.md``).
        """
        request = SearchRequest(image=image, region=region, text=text, k=k, exclude_self=exclude_self, region_id=region_id, filters=filters)
        return self._run(request, None)

    def search_batch(self, requests: Sequence[SearchRequest], *, batch_size: int = 16) -> list[list[Hit] | EngineError]:
        """Each request's hits, or the :class:`EngineError` that request raised (the others still run).

        The query regions are encoded in batches: the regions of one image share one backbone pass,
        and images of the same size are batched ``batch_size`` at a time.
        """
        from query.batch import encode_requests

        pipeline = self.sharded.first_pipeline() if self.sharded is not None else self.pipeline
        encoded = encode_requests(pipeline.query_encoder(), requests, batch_size=batch_size)
        out: list[list[Hit] | EngineError] = []
        for i, request in enumerate(requests):
            try:
                enc = encoded.get(i)
                if isinstance(enc, EngineError):
                    raise enc
                out.append(self._run(request, enc))
            except EngineError as exc:
                out.append(exc)
        return out

    def region(self, region_id: int):  # -> indexer.store.RegionRow
        """The indexed region ``region_id`` (image path, box, …); :class:`UnknownIdError` when it is not in the index.

        Reads the index only (no model loads)."""
        if self.sharded is not None:
            return self.sharded.region(region_id)
        rows = self._open_reader().regions([region_id])
        if not rows:
            raise UnknownIdError(f"region {region_id} is not in index {self.index_dir}; region ids come from earlier hits (engine query --json)")
        return rows[0]

    def image(self, image_id: int):  # -> indexer.store.ImageEntry
        """The indexed image ``image_id`` (id, path, size); :class:`UnknownIdError` when the index holds none with that id."""
        if self.sharded is not None:
            return self.sharded.image(image_id)
        entry = self._open_reader().image(image_id)
        if entry is None:
            raise UnknownIdError(f"image {image_id} is not in index {self.index_dir}; image ids come from the image listing (GET /api/images)")
        return entry

    def images(self, *, offset: int = 0, limit: int = 100):  # -> list[indexer.store.ImageEntry]
        """Indexed images by id, ``limit`` of them from the ``offset``-th."""
        if self.sharded is not None:
            return self.sharded.images(offset=offset, limit=limit)
        return self._open_reader().images(offset=offset, limit=limit)

    @property
    def pipeline(self):  # -> query.pipeline.QueryPipeline
        """The query pipeline over the open index, built once from this engine's models (loaded on first use)."""
        if self._pipeline is None:
            from query.pipeline import QueryPipeline

            if self.sharded is not None:
                raise InvalidInputError(f"index {self.index_dir} is sharded: search it with Engine.search / engine query (one shard's pipeline covers only its images)")
            self._pipeline = QueryPipeline(store=self._open_reader(), models=self, config=self.config)
        return self._pipeline

    def _run(self, request: SearchRequest, encoded: EncodedQuery | None) -> list[Hit]:
        request.validate()
        if self.sharded is not None:
            return self.sharded.search().run(request, encoded)
        return self.pipeline.run(request, encoded)

    @property
    def grounding_models(self):  # -> query.localize.GroundingModels
        """Stage 3's fitted weights, Ref-NMS model and CM-Att scorer, loaded once."""
        if self._grounding is None:
            from engine.device import resolve_device
            from engine.models.cm_att import REGION_GROUNDING_NAME
            from engine.models.registry import load_model
            from query.localize import GroundingModels, load_stage3_weights

            device = resolve_device(self.config.device)
            weights = self.config.stage3_weights or load_stage3_weights()
            scorer = load_model(self.config.grounding_checkpoint or REGION_GROUNDING_NAME, device=device, family="cm-att")
            self._grounding = GroundingModels(weights=weights, ref_nms=self.ref_nms_model, scorer=scorer)
        return self._grounding

    @property
    def retrieval_model(self):  # -> RegionRetrievalModel
        """The text-gated reranker (GRN), loaded once from ``config.grn_checkpoint`` or the shipped default."""
        if self._retrieval_model is None:
            from engine.device import resolve_device
            from engine.models.registry import load_model

            device = resolve_device(self.config.device)
            self._retrieval_model = load_model(self._grn_path(device), device=device, family="grn-family")
        return self._retrieval_model

    def _grn_path(self, device):  # noqa: ANN001, ANN202
        """``config.grn_checkpoint``, else the shipped default for this index and device
        (:func:`query.rerank.default_grn_checkpoint`)."""
        from indexer.index_dir import IndexLayout
        from query.rerank import default_grn_checkpoint

        if self.config.grn_checkpoint is not None:
            return self.config.grn_checkpoint
        if self.sharded is not None:  # chosen as for one index of all the shards' regions
            return default_grn_checkpoint(self.sharded.readers()[0], on_gpu=device.type == "cuda", fc_from_regions=self.config.fc_from_regions, regions=self.sharded.regions())
        store = self._open_reader() if IndexLayout(self.index_dir.expanduser().resolve()).exists() else None
        return default_grn_checkpoint(store, on_gpu=device.type == "cuda", fc_from_regions=self.config.fc_from_regions)

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
        """Counts, index type, device and models of the index (an ``IndexInfo``; a sharded index's summed)."""
        if self.sharded is not None:
            return self.sharded.info()
        return self._open_reader().info()

    def errors(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every image that could not be indexed."""
        if self.sharded is not None:
            return self.sharded.errors()
        return self._open_reader().errors()

    # -- maintenance --------------------------------------------------------------------------
    def remove(self, paths: list[Path | str] | tuple[Path | str, ...]):  # -> indexer.removal.RemoveSummary
        """Remove the images at ``paths`` (image files, or folders: every image indexed under them).

        All or nothing: a path with no indexed image at or under it raises ``InvalidInputError``
        naming it, and nothing is removed. Takes the writer lock; the FAISS files are saved without
        the removed regions, whose feature rows stay dead until :meth:`compact`.
        """
        from indexer.removal import remove_paths
        from indexer.store import IndexStore

        if self.sharded is not None:
            return self.sharded.remove(list(paths))
        self._close_reader()
        with IndexStore.open(self.index_dir, writable=True, config=self.config.store) as store:
            return remove_paths(store, list(paths))

    def compact(self):  # -> indexer.compaction.CompactSummary
        """Rewrite the feature store without the rows of removed or replaced images (crash-safe,
        under the writer lock); returns the bytes before and after (``docs/index-layout.md``)."""
        from indexer.store import IndexStore

        if self.sharded is not None:
            return self.sharded.compact()
        self._close_reader()
        with IndexStore.open(self.index_dir, writable=True, config=self.config.store) as store:
            return store.compact()

    def check(self, *, repair: bool = False):  # -> indexer.integrity.CheckReport
        """Verify every file of the index against its database (sizes, checksums recorded at commit and save);
        with ``repair`` rebuild the FAISS files and region table and re-extract the damaged images' features
        (under the writer lock). See ``docs/index-layout.md``, "Checksums and `engine check`"."""
        from indexer.integrity import check_index, repair_index

        if self.sharded is not None:
            each = "; ".join(f"engine check --index {p}" for p in self.sharded.layout.paths)
            raise InvalidInputError(f"index {self.index_dir} is sharded; check each shard, an ordinary index, on its own: {each}")
        self._close_reader()
        if not repair:
            return check_index(self.index_dir, config=self.config.store)
        return repair_index(self.index_dir, config=self.config.store, reindex=self._reindex_damaged)

    def _reindex_damaged(self, store: IndexStore, job: ReindexJob) -> None:
        """Extract ``job``'s images again into ``store`` with the models their run used (else a clear error)."""
        from indexer.proposal_sources import create_proposal_provider

        proposals = create_proposal_provider(job.proposals, job.corpus, backbone=self.extractor.backbone)
        pipeline = self._indexing_pipeline(store, proposals, IndexConfig())  # batch and save settings: the defaults
        models = pipeline.models
        differ = sorted(k for k in set(models) & set(job.models) if models[k] != job.models[k])
        if differ:
            raise IndexVersionError(
                f"{len(job.paths)} image(s) were indexed with other models ({', '.join(f'{k}: {job.models[k]}' for k in differ)}); "
                f"this engine loads {', '.join(models[k] for k in differ)}; configure those models, or re-index into a new directory"
            )
        pipeline.reindex(list(job.paths), corpus=job.corpus)

    def close(self) -> None:
        self._close_reader()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_reader(self):
        from indexer.store import IndexStore

        if self._reader is None:
            try:
                self._reader = IndexStore.open(self.index_dir, config=self.config.store, visual_key=self.visual_key)
            except Exception as exc:  # a reader on a full disk: SQLite cannot create its -shm/-wal files
                from engine.diskspace import disk_full_error

                full = disk_full_error(
                    exc,
                    doing=f"opening the index at {self.index_dir}",
                    advice="a reader needs a little space for SQLite's -shm/-wal files; free some on that disk and run the query again",
                    where=Path(self.index_dir),
                )
                if full is not None:
                    raise full from exc
                raise
        return self._reader

    def _close_reader(self) -> None:
        self._pipeline = None
        if self._sharded is not None:
            self._sharded.close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _same_model(store, key: str, model, what: str, name: str):  # noqa: ANN001, ANN202
    """``model`` when the index's earlier runs stored ``what`` of this very model (``models[key]``), or none yet;
    else a clear error (an array's rows must all come from one model)."""
    indexed = store.models().get(key)
    if indexed and indexed != model.version:
        raise IndexVersionError(
            f"index {store.path} holds {what} of {indexed}, but this engine loads {model.version}; "
            f"configure the {name} it was built with, or index into a new directory"
        )
    return model
