"""The query pipeline: one request, top to bottom, from encoding to hits (``docs/query-pipeline.md``).

:meth:`QueryPipeline.run` reads like the steps of a query::

    prepared = self.prepare(request)              # EncodedQuery + the stage-2 scorer -> PreparedQuery
    ranked = self.rank(prepared)                  # stage 1 (Candidates) -> stage 2 (StageScores) -> hits
    grounded = self.ground(prepared, ranked, M)   # stage 3: {image: Stage3Candidates}
    hits = rank_stage3(ranked, grounded, ...)     # grounded hits first, then the filters, top k

It is built once per open index by :class:`engine.api.Engine` from what the engine loads (the index,
the backbone's region extractor, the GRN, SAN's encoder, the grounding models); models load on first
use, so a visual query never loads the GRN. ``Engine.search``, ``Engine.search_batch``, ``engine eval
fusion`` / ``stage3``, ``engine bench`` and the exhaustive benchmark all run queries through it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from engine.errors import IndexVersionError, InvalidInputError
from engine.results import Hit
from indexer.store import CONCEPT_ARRAY, INSTANCE_ARRAY, MAPS_ARRAY, VECTOR_ARRAY, IndexStore, RegionRow
from query.encode import EncodedQuery, VisualQueryEncoder, load_query_region
from query.localize import GroundingModels, GroundingStage, Stage3Candidates, best_images, stage2_depth, stage3_hits
from query.request import SearchRequest
from query.rerank import FusedRescorer, GrnRescorer, LayoutRescorer, Rescorer, SanRescorer, StageScores, read_region_maps
from query.search import Candidates, SearchOptions, ranked_hits, search_regions
from query.concept_search import ConceptRescorer, SanPart, concept_gate, concept_scores, text_candidates, text_models_cover
from engine.models.concepts import conse_scores

if TYPE_CHECKING:  # the models' classes, named for the types only
    from engine.models.concepts import ConceptVocabulary
    from engine.models.text_projection import TextProjection
    from indexer.concept_evidence import ConceptEvidence
    from engine.models.retrieval import RegionRetrievalModel
    from indexer.region_features import RegionFeatureExtractor
    from indexer.san_features import SanRegionEncoder

__all__ = ["QueryModels", "PipelineSettings", "EncodedQuery", "PreparedQuery", "QueryPipeline", "StageScores"]

log = logging.getLogger(__name__)

SAN_ARRAY = "san"


class QueryModels(Protocol):
    """The parts a pipeline runs, loaded on first use (:class:`engine.api.Engine` is one)."""

    @property
    def extractor(self) -> RegionFeatureExtractor: ...

    @property
    def retrieval_model(self) -> RegionRetrievalModel: ...  # the stage-2 GRN

    @property
    def san_encoder(self) -> SanRegionEncoder: ...

    @property
    def grounding_models(self) -> GroundingModels: ...

    @property
    def concept_evidence(self) -> ConceptEvidence: ...

    @property
    def concept_vocabulary(self) -> ConceptVocabulary: ...

    @property
    def text_projection(self) -> TextProjection | None: ...  # None: the engine maps no text into the visual key space


class PipelineSettings(Protocol):
    """What the pipeline reads of :class:`engine.config.EngineConfig`."""

    @property
    def shortlist(self) -> int: ...

    @property
    def stage3(self) -> bool: ...

    @property
    def san(self) -> bool: ...

    @property
    def san_candidates(self) -> int: ...

    @property
    def text_weight(self) -> float: ...

    @property
    def image_weight(self) -> float: ...

    @property
    def layout_weight(self) -> float: ...

    @property
    def layout_shortlist(self) -> int: ...

    @property
    def instance_shortlist(self) -> int: ...

    @property
    def concepts(self) -> bool: ...

    @property
    def concept_weight(self) -> float: ...

    @property
    def concept_gate(self) -> tuple[float, float]: ...

    @property
    def san_gate(self) -> float: ...

    @property
    def projection_weight(self) -> float: ...

    @property
    def proposal_weight(self) -> float: ...

    @property
    def san_weight(self) -> float: ...

    @property
    def combined_san_weight(self) -> float: ...

    @property
    def san_text_gate(self) -> tuple[float, float]: ...


@dataclass(frozen=True)
class PreparedQuery:
    """A request encoded, with its stage-2 scorer (``None``: a visual-only query, ranked by stage 1) and
    the regions that join stage 1's shortlist (SAN's matches of the text): what stages 1–3 need."""

    request: SearchRequest
    query: EncodedQuery
    options: SearchOptions
    rescore: Rescorer | None = None
    extra_ids: tuple[int, ...] = ()
    relevance: np.ndarray | None = None  # a text-only query through the open vocabulary: its class relevances
    projected: np.ndarray | None = None  # and its text in the visual key space (the text projection), if any
    san: SanPart | None = None  # and SAN's part, when SAN reads every word (MiniLM) and has a weight


def reads_every_word(words: object) -> bool:
    """Whether a text model's word encoding reads any English word (MiniLM word features, not a vocabulary)."""
    return getattr(words, "kind", "vocab") == "minilm"


class QueryPipeline:
    """Stages 1–3 of every query over one open index (module doc).

    Args:
        store: the open index (read-only).
        models: the models, loaded on first use.
        config: an :class:`engine.config.EngineConfig` (shortlist, SAN, fusion weights, stage 3).
    """

    def __init__(self, *, store: IndexStore, models: QueryModels, config: PipelineSettings) -> None:
        self.store = store
        self.models = models
        self.config = config

    # -- the request, top to bottom -----------------------------------------------------------
    def run(self, request: SearchRequest, encoded: EncodedQuery | None = None) -> list[Hit]:
        """The request's hits. ``encoded``: its query region when already encoded (batches)."""
        prepared = self.prepare(request, encoded)
        if not self.grounds(prepared):
            return self.rank(prepared)
        weights = self.models.grounding_models.weights
        depth = stage2_depth(request.k, weights.images, prepared.options.filters.max_per_image, self.config.shortlist)
        ranked = self.rank(prepared, k=depth)
        grounded = self.ground(prepared, ranked, weights.images)
        hits = stage3_hits(ranked, grounded, weights, prepared.options.filters)
        if len(hits) < request.k and len(ranked) == depth < self.config.shortlist:
            # copies of a picture removed as duplicates: the rest of the shortlist (the grounded images stay the first ones)
            hits = stage3_hits(self.rank(prepared, k=self.config.shortlist), grounded, weights, prepared.options.filters)
        return hits[: request.k]

    def prepare(self, request: SearchRequest, encoded: EncodedQuery | None = None) -> PreparedQuery:
        """The request validated and encoded, with its stage-2 scorer."""
        request.validate()
        SearchOptions(k=request.k, shortlist=self.config.shortlist)  # validates before any model loads
        if request.image is None and request.region_id is None:
            text = str(request.text)
            if self.through_concepts(text, combined=False):
                options = SearchOptions(k=request.k, shortlist=self.config.shortlist, filters=request.filters)
                query = EncodedQuery(vector=np.zeros(0, np.float32), array=CONCEPT_ARRAY, stage1="concept")
                sentence = self.models.concept_vocabulary.text_vector(text)
                relevance = self.models.concept_vocabulary.table.relevance(sentence)
                return PreparedQuery(request=request, query=query, options=options, relevance=relevance, projected=self.text_key(sentence), san=self.san_part(text))
            query = self.encode_text(text)
            rescore: Rescorer | None = SanRescorer(store=self.store, model=self.models.san_encoder.model, text=text)
            extra: tuple[int, ...] = ()
        else:
            text = request.text
            vocabulary = text is not None and self.through_concepts(text, combined=True)
            # a text in the first-wave models' words is checked against the query region by SAN: its vector comes from the same backbone pass
            query = self.encode(request, encoded, san=text is not None and not vocabulary and self.gates_with_san())
            if text is None:
                rescore, extra = self.layout_scorer(query), ()
            elif vocabulary or not self.san_relates(request, query, text):
                rescore, extra = self.concept_scorer(request, query, text), ()
            else:
                rescore, extra = self.stage2_scorer(query, text)
        digest = query.content_hash if request.exclude_self else None
        options = SearchOptions(k=request.k, exclude_self_hash=digest, shortlist=self.stage2_fetch(rescore), filters=request.filters)
        return PreparedQuery(request=request, query=query, options=options, rescore=rescore, extra_ids=extra)

    def rank(self, prepared: PreparedQuery, k: int | None = None) -> list[Hit]:
        """Stages 1–2: the ``k`` (default the request's) best hits after the filters."""
        options = prepared.options if k is None else replace(prepared.options, k=k)
        query = prepared.query
        if prepared.relevance is not None:
            return self.rank_concepts(prepared.relevance, options, prepared.projected, prepared.san)
        return search_regions(self.store, query.vector, options, prepared.rescore, array=query.array, stage1=query.stage1, extra_ids=prepared.extra_ids)

    def grounds(self, prepared: PreparedQuery) -> bool:
        """Whether stage 3 runs: a combined query (image or region id, and text) with ``config.stage3``."""
        return bool(self.config.stage3) and prepared.request.text is not None and prepared.query.visual and not isinstance(prepared.rescore, ConceptRescorer)

    def ground(self, prepared: PreparedQuery, ranked: list[Hit], images: int) -> dict[str, Stage3Candidates]:
        """Stage 3: the grounded candidates of the first ``images`` images of the stage-2 ranking ``ranked``
        (those that can be grounded), in that order."""
        if prepared.rescore is None or prepared.request.text is None:
            raise InvalidInputError("stage 3 grounds the text of a combined query; give the query a text")
        return self.grounding_stage().candidates_many(best_images(ranked, images), prepared.request.text, prepared.rescore, prepared.query.vector)

    # -- the steps ----------------------------------------------------------------------------
    def encode(self, request: SearchRequest, encoded: EncodedQuery | None = None, *, san: bool = False) -> EncodedQuery:
        """A visual query's region: ``encoded`` when already encoded (a batch, or a sharded index's query encoded
        once by the shard that holds it), an indexed region's stored features (``region_id``), or the region of
        the query image passed through the backbone; with its class evidence
        when the index stores it, and (``san``) its SAN vector from the same pass."""
        if encoded is not None:
            return encoded
        if request.region_id is not None:
            row = self.region(request.region_id)
            rows = np.asarray([row.row], np.int64)
            vector = self.store.read_arrays(VECTOR_ARRAY, rows)[0].astype(np.float32)
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
            concepts = self.store.read_arrays(CONCEPT_ARRAY, rows)[0] if self.store.has_array(CONCEPT_ARRAY) else None
            return EncodedQuery(vector=vector, query_map=read_region_maps(self.store, rows)[0], content_hash=row.content_hash, concepts=concepts)
        return self.query_encoder(san=san).encode(load_query_region(request.image, request.region))

    def query_encoder(self, *, san: bool = False) -> VisualQueryEncoder:
        """The encoder of query regions over this index: the visual key and map, the class evidence when the
        index serves the open vocabulary, and (``san``) SAN's visual vector, all from one backbone pass."""
        evidence = self.models.concept_evidence if self.uses_concepts() else None
        return VisualQueryEncoder(self.models.extractor, evidence, self.models.san_encoder if san else None)

    def uses_concepts(self) -> bool:
        """Whether this index serves text through the open vocabulary (configured, and the index stores the evidence)."""
        return bool(self.config.concepts) and self.store.has_array(CONCEPT_ARRAY)

    def through_concepts(self, text: str, *, combined: bool) -> bool:
        """Whether ``text`` goes through the open vocabulary: the index has it, and the first-wave text model of
        the query kind (the GRN for a combined query, SAN for a text-only one) does not know every content word.
        A text-only query always does when SAN reads MiniLM word features: SAN is then one of its parts
        (:meth:`san_part`)."""
        if not self.uses_concepts():
            return False
        vocab = self.models.retrieval_model.vocab if combined else self.models.san_encoder.model.vocab
        if not combined and reads_every_word(vocab):
            return True
        return vocab is None or not text_models_cover(text, vocab)

    def gates_with_san(self) -> bool:
        """Whether a combined query in the first-wave models' words is checked by :meth:`san_relates` (the index
        serves the open vocabulary and holds SAN's vectors)."""
        return self.uses_concepts() and bool(self.config.san) and self.store.has_array(SAN_ARRAY)

    def san_relates(self, request: SearchRequest, query: EncodedQuery, text: str) -> bool:
        """Whether the first-wave models can read ``text`` in THIS query region: SAN's score of the region for
        the text reaches ``config.san_gate`` (fitted on val: shapes-world regions score their own texts
        0.31 and more in 95 % of queries, real photographs' regions theirs under 0.15 in 86 %). Always
        True where :meth:`gates_with_san` is not (the first-wave path, as before)."""
        if not self.gates_with_san():
            return True
        vector = query.san_vector
        if vector is None:  # an indexed region (its stored vector), or a query encoded in a batch without it
            if request.region_id is not None:
                vector = self.store.read_arrays(SAN_ARRAY, np.asarray([self.region(request.region_id).row], np.int64))[0].astype(np.float32)
            else:
                vector = self.encode(request, san=True).san_vector
        return float(self.models.san_encoder.model.score(text, np.asarray(vector)[None])[0]) >= self.config.san_gate

    def concept_scorer(self, request: SearchRequest, query: EncodedQuery, text: str) -> ConceptRescorer:
        """A combined query's stage 2 through the open vocabulary (:class:`~query.concept_search.ConceptRescorer`)."""
        relevance = self.models.concept_vocabulary.relevance(text)
        evidence = query.concepts if query.concepts is not None else self.encode(request).concepts  # one more pass for a query encoded without it
        own = float(conse_scores(np.asarray(evidence)[None], relevance)[0])
        gate = concept_gate(own, floor=self.config.concept_gate[0], ceiling=self.config.concept_gate[1])
        san = self.combined_san(text)
        return ConceptRescorer(store=self.store, base=self.layout_scorer(query), vector=query.vector, relevance=relevance, weight=self.config.concept_weight, gate=gate, san=san, san_weight=self.config.combined_san_weight if san is not None else 0.0)

    def combined_san(self, text: str) -> SanRescorer | None:
        """SAN's scorer of candidates for ``text`` in a combined query through the open vocabulary: when SAN
        reads every word (MiniLM), ``config.combined_san_weight`` is positive and the index holds its vectors."""
        if self.config.combined_san_weight <= 0 or not self.config.san or not self.store.has_array(SAN_ARRAY):
            return None
        model = self.models.san_encoder.model
        if not reads_every_word(model.vocab):
            return None
        self.check_san_index()
        return SanRescorer(store=self.store, model=model, text=text)

    def rank_concepts(self, relevance: np.ndarray, options: SearchOptions, projected: np.ndarray | None = None, san: SanPart | None = None) -> list[Hit]:
        """A text-only query through the open vocabulary: every region scored by ConSE, and with the text
        ``projected`` into the visual key space its FAISS matches too, and with ``san`` SAN's
        (:func:`~query.concept_search.text_candidates`)."""
        regions, scores = concept_scores(self.store, relevance)  # every region scored once
        fetch = min(len(regions), options.shortlist)
        while True:
            pool, parts = text_candidates(self.store, regions, scores, projected, self.config.projection_weight, fetch, san, proposal_weight=self.config.proposal_weight)
            hits = ranked_hits(self.store, Candidates(pool, parts.concept, "concept"), replace(parts, concept=None), options)
            if len(hits) >= options.k or fetch >= len(regions):
                return hits[: options.k]
            fetch = min(len(regions), fetch * 4)

    def text_key(self, sentence: np.ndarray) -> np.ndarray | None:
        """A text's MiniLM ``sentence`` vector mapped into the visual key space by the text projection
        (``None`` when the engine has none or ``config.projection_weight`` is 0)."""
        projection = self.models.text_projection if self.config.projection_weight > 0 else None
        return None if projection is None else projection.apply(sentence)

    def san_part(self, text: str) -> SanPart | None:
        """SAN's part in a text-only query through the open vocabulary: when SAN reads every word (MiniLM),
        ``config.san_weight`` is positive and the index holds this SAN's vectors; else ``None``."""
        if self.config.san_weight <= 0 or not self.config.san or not self.store.has_array(SAN_ARRAY):
            return None
        model = self.models.san_encoder.model
        if not reads_every_word(model.vocab):
            return None
        self.check_san_index()
        return SanPart(vector=model.text_vector(text), score=SanRescorer(store=self.store, model=model, text=text), weight=self.config.san_weight, gate=self.config.san_text_gate)

    def encode_text(self, text: str) -> EncodedQuery:
        """A text-only query: SAN's text vector ``t_g``, searched in the ``san`` FAISS file."""
        self.check_san_index()
        return EncodedQuery(vector=self.models.san_encoder.model.text_vector(text), array=SAN_ARRAY, stage1="san_text")

    def layout_scorer(self, query: EncodedQuery) -> LayoutRescorer | None:
        """A region-only query's stage 2 (:class:`~query.rerank.LayoutRescorer`), or ``None`` (ranked by the
        visual key alone) when ``config.layout_weight`` and ``config.instance_weight`` are both 0, the index holds no 7×7 maps, or the query
        has no spatial map (an indexed region of such an index)."""
        if (self.config.layout_weight == 0 and self.config.instance_weight == 0) or not self.store.has_array(MAPS_ARRAY) or query.query_map is None:
            return None
        if query.query_map.ndim != 3 or query.query_map.shape[1] == 1:
            return None
        head = self.models.instance_head if self.config.instance_weight > 0 else None
        stored = head is not None and self.store.has_array(INSTANCE_ARRAY) and self.store.models().get("instance_head") == head.version
        return LayoutRescorer(store=self.store, vector=query.vector, query_map=query.query_map, weight=self.config.layout_weight, head=head, head_weight=self.config.instance_weight, stored=stored, keep=self.config.layout_shortlist)

    def stage2_fetch(self, rescore: Rescorer | None) -> int:
        """How many stage-1 candidates ``rescore`` takes: a region-only stage 2 (alone or as the base of a
        combined query through the vocabulary) ``config.layout_shortlist``, or ``config.instance_shortlist``
        when it reads the index's stored instance embeddings (then the layout runs on the best
        ``layout_shortlist`` of them); any other ``config.shortlist``."""
        layout = rescore.base if isinstance(rescore, ConceptRescorer) else rescore
        if isinstance(layout, LayoutRescorer):
            return max(self.config.instance_shortlist, self.config.layout_shortlist) if layout.stored else self.config.layout_shortlist
        if isinstance(rescore, ConceptRescorer):
            return self.config.layout_shortlist
        return self.config.shortlist

    def stage2_scorer(self, query: EncodedQuery, text: str) -> tuple[Rescorer, tuple[int, ...]]:
        """A combined query's stage-2 scorer — the GRN, fused with SAN (``image_weight · grn + text_weight ·
        san``) when SAN serves the text — and the SAN candidates that join its shortlist."""
        model = self.models.retrieval_model
        model.encode_text(text)  # unknown-only or empty text fails here, before any scoring
        rescore: Rescorer = GrnRescorer(store=self.store, model=model, query_map=query.query_map, text=text)
        san_vector = self.san_text_vector(text)
        extra = self.san_candidates(san_vector) if san_vector is not None else ()
        if san_vector is not None and self.config.text_weight > 0:
            san = SanRescorer(store=self.store, model=self.models.san_encoder.model, text=text)
            rescore = FusedRescorer(rescore, san, text_weight=self.config.text_weight, image_weight=self.config.image_weight)
        return rescore, extra

    def san_text_vector(self, text: str) -> np.ndarray | None:
        """SAN's text vector when SAN can serve a combined query (the engine uses SAN, the index holds
        this SAN model's embeddings, SAN knows a word of the text); ``None`` and the GRN works alone."""
        if not self.config.san or not self.store.has_array(SAN_ARRAY):
            return None
        try:
            self.check_san_index()
            return self.models.san_encoder.model.text_vector(text)
        except (IndexVersionError, InvalidInputError) as exc:
            log.info("SAN does not serve this query: %s", exc)
            return None

    def san_candidates(self, vector: np.ndarray) -> tuple[int, ...]:
        """Region ids of the SAN text ``vector``'s top ``config.san_candidates`` matches."""
        if self.config.san_candidates <= 0:
            return ()
        _, ids = self.store.search(np.asarray(vector)[None], self.config.san_candidates, array=SAN_ARRAY)
        return tuple(int(i) for i in ids[0] if i >= 0)

    def check_san_index(self) -> None:
        """A clear error when the index holds no SAN embeddings, or ones of another SAN model."""
        if not self.store.has_array(SAN_ARRAY):
            raise IndexVersionError(
                f"index {self.store.path} was built without SAN embeddings, which text-only search needs; "
                f"re-index the corpus into a new directory: engine index CORPUS --index NEWDIR"
            )
        indexed = self.store.models().get("san")
        version = self.models.san_encoder.version
        if indexed and indexed != version:
            raise IndexVersionError(
                f"index {self.store.path} holds SAN embeddings of {indexed}, but this engine loads {version}; "
                f"re-index the corpus into a new directory (engine index CORPUS --index NEWDIR) or configure the SAN checkpoint it was built with"
            )

    def grounding_stage(self) -> GroundingStage:
        """Stage 3 over this index (Ref-NMS reads its stored visual features when they are this model's)."""
        from indexer.store import REFNMS_ARRAY

        parts = self.models.grounding_models
        stored = self.store.has_array(REFNMS_ARRAY) and self.store.models().get("ref_nms") == parts.ref_nms.version
        return GroundingStage(
            store=self.store,
            ref_nms=parts.ref_nms,
            scorer=parts.scorer,
            image_vector=lambda path: VisualQueryEncoder(self.models.extractor).image_vector(path),
            region_maps=lambda path, rows: VisualQueryEncoder(self.models.extractor).region_maps(path, rows),
            stored_relatedness_features=stored,
        )

    def region(self, region_id: int) -> RegionRow:
        """The indexed region ``region_id`` (a ``RegionRow``); a clear error when it is not in the index."""
        rows = self.store.regions([region_id])
        if not rows:
            raise InvalidInputError(f"region {region_id} is not in index {self.store.path}; region ids come from earlier hits (engine query --json)")
        return rows[0]
