"""Typed configuration of the engine. Each part configures one component family."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import InvalidInputError
from typing import TYPE_CHECKING

from indexer.component_configs import BackboneConfig, RegionFeatureConfig
from indexer.store import StoreConfig

if TYPE_CHECKING:  # query.localize loads the models' code (torch): only its weights' type is named here
    from query.localize import Stage3Weights

__all__ = ["DEFAULT_INDEX_DIR", "INDEX_ENV_VAR", "MAX_WEIGHT", "EngineConfig", "IndexConfig", "default_index_dir"]

DEFAULT_INDEX_DIR = Path(".engine")
INDEX_ENV_VAR = "ENGINE_INDEX"
TEXT_WEIGHT = 1.0
"""Default weight of SAN's text–region score in a combined query's stage 2 (``engine eval fusion`` fits it)."""
LAYOUT_WEIGHT = 10.0
"""Default weight of the 7×7 layout similarity in a region-only query's stage 2 (``visual + w · layout +
v · instance``; fitted on the val splits by ``benchmarks/layout_fit.py``, docs/query-pipeline.md)."""
LAYOUT_SHORTLIST = 500
"""Stage-1 candidates a region-only query reranks by layout (fitted with :data:`LAYOUT_WEIGHT`)."""
INSTANCE_SHORTLIST = 2000
"""Stage-1 candidates a region-only query ranks by ``visual + v · instance`` when the index stores the instance
head's embeddings (array ``instance``), before the layout stage takes the best :data:`LAYOUT_SHORTLIST`
of them (fitted on the val splits by ``benchmarks/layout_fit.py``, docs/query-pipeline.md)."""
INSTANCE_WEIGHT = 5.0
"""Weight of the instance head's cosine in a region-only query's stage 2 (fitted on the val splits with
:data:`LAYOUT_WEIGHT`, docs/query-pipeline.md)."""
CONCEPT_WEIGHT = 0.2
"""Weight of the open vocabulary's ConSE score in a combined query's stage 2 (``base + w · gate · concept``;
fitted on the val splits by ``benchmarks/text_fit.py``)."""
CONCEPT_GATE = (0.4, 0.6)
"""The query region's own ConSE score at which the text starts to count (gate 0) and counts fully (gate 1)."""
SAN_GATE = 0.2
"""SAN's score of the query region for its text from which a combined query whose words the first-wave
models all know is read by them (GRN + SAN + stage 3); below it the open vocabulary reads it (fitted
on the val splits: docs/open-vocabulary.md)."""
PROJECTION_WEIGHT = 1.5
"""Weight of the text projection's cosine in a text-only query through the open vocabulary (``concept +
w · projection``; fitted on the val splits, docs/open-vocabulary.md)."""
PROPOSAL_WEIGHT = 0.25
"""Weight of each candidate's proposal prior in a text-only query through the open vocabulary (``... + w ·
prior``, :func:`query.concept_search.proposal_prior`: the log of the region's stored proposal score — the RPN
box head's predicted IoU and objectness — relative to the best of its image's candidates): among an image's
boxes, the one that fits an object wins over parts of it. Fitted on the val splits (stamps 368 / shapes 93
text-only queries; 0, 0.25, 0.5, 1.0 tried), docs/open-vocabulary.md."""
SAN_WEIGHT = 2.0
"""Weight of SAN's text–region score in a text-only query through the open vocabulary, when SAN reads MiniLM
word features (``concept + projection_weight · projection + w · gate · san``). Fitted on the val splits
(stamps 368 + shapes 93 text-only queries, docs/open-vocabulary.md): 1, 2, 4 with the gate below."""
SAN_TEXT_GATE = (0.5, 0.6)
"""The range (floor, ceiling) of SAN's confidence in a text-only query (the cosine of its best FAISS match)
over which its weight goes from 0 to ``san_weight``; (-1, -1): always the full weight. Fitted on the val
splits: SAN's best match scores shapes texts 0.57 / 0.65 (5th pct / median), stamps texts 0.48 / 0.65
(median / 90th pct); of (0.5, 0.6), (0.55, 0.65), (0.6, 0.7) the first gives the most right boxes in
the top 10 over both worlds."""
COMBINED_SAN_WEIGHT = 0.0
"""Weight of SAN's text–region score in a combined query through the open vocabulary, when SAN reads MiniLM
word features (``base + gate · (concept_weight · concept + w · san)``). 0: on the stamps val split (368
combined queries) 0.2 / 0.5 / 1 gave box@1 0.883 / 0.880 / 0.878 against 0.889 without it."""
MAX_WEIGHT = 100.0
"""Largest stage-2 weight (``text_weight``, ``image_weight``; ``--weight-*``): the defaults are 1, 100
already ranks by one score alone, and a huge weight would overflow the fused score."""


def default_index_dir() -> Path:
    """``$ENGINE_INDEX`` when set, else ``.engine/`` in the working directory."""
    return Path(os.environ.get(INDEX_ENV_VAR) or DEFAULT_INDEX_DIR)


@dataclass(frozen=True)
class EngineConfig:
    """Models and storage of an engine.

    ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. ``grn_checkpoint`` is the text-gated
    reranker (``None``: the shipped ``grn.pt``, or ``grn-fc.pt`` on the CPU for an index of at least
    ``fc_from_regions`` regions; see ``Engine._grn_path``); ``shortlist`` the stage-1 candidates it rescores.
    ``san``: index SAN region embeddings (text-only search) with ``san_checkpoint`` and
    ``saliency_checkpoint`` (``None``: the shipped ``san.pt`` / ``saliency.pt``); ``san_candidates``:
    how many SAN candidates of the text join stage 1's shortlist of a combined query (1000: with
    fewer, recall@10 against exhaustive stage-2 scoring falls from 0.97 to 0.73 at 100K regions;
    docs/benchmarks.md);
    ``text_weight`` / ``image_weight``: stage 2 of a combined query ranks by
    ``image_weight · grn + text_weight · san`` (SAN's text–region score; text weight 0 ranks by the
    GRN alone); the text weight is fitted on the validation split by
    ``engine eval fusion`` (docs/grn.md). ``stage3``: a combined query grounds its text in the best
    ``stage3_weights.images`` images (Ref-NMS with ``ref_nms_checkpoint``, CM-Att with
    ``grounding_checkpoint``; ``None``: the shipped ``ref-nms-r`` and ``cm-att-erase-region``, and the
    weights fitted by ``engine eval stage3`` in ``engine/checkpoints/stage3.json``); see
    ``query/localize.py``. ``layout_weight``: a region-only query (no text) reranks its first
    ``layout_shortlist`` stage-1 candidates by ``visual + layout_weight · layout``, the visual key's
    cosine plus the aligned similarity of the 7×7 maps (``query.rerank.LayoutRescorer``); 0 ranks by
    the visual key alone, as does an index built without maps. ``instance_head`` (a shipped name or a
    ``.pt`` path; ``None``: none) adds ``instance_weight ·`` the cosine of its embeddings of the query's
    and each candidate's stored map and key to that sum (``engine.models.instance_head``); an index built
    with the head stores each region's embedding (array ``instance``), and a query then ranks its first
    ``instance_shortlist`` stage-1 candidates by ``visual + instance_weight · instance`` and computes the
    layout for the best ``layout_shortlist`` of them only. ``concepts``: index each region's
    ImageNet class evidence and serve texts that the first-wave text models do not fully know through
    the open vocabulary (``query/concept_search.py``): a combined query then ranks by ``base +
    concept_weight · gate · concept`` (``gate`` from the query region's own ConSE score over the range
    ``concept_gate``), a text-only one by ConSE over every region. ``san_gate``: a combined query whose
    content words the first-wave models all know still goes through the open vocabulary when SAN scores
    the query region under this for the text (they cannot read it in this picture).
    ``text_projection``: the map from English into the visual key space (a shipped name or a ``.pt``
    path; ``None``: none) with which a text-only query through the open vocabulary also searches the
    visual FAISS file, ranking by ``concept + projection_weight · projection + proposal_weight · log(proposal
    score)``. ``san_weight``: with a SAN
    that reads MiniLM word features (every word), every text-only query goes through the open vocabulary
    and SAN is one more part: its FAISS matches join the candidates and the sum gains ``san_weight · san``;
    ``combined_san_weight``: likewise, a combined query through the open vocabulary ranks by ``base + gate ·
    (concept_weight · concept + combined_san_weight · san)``. ``ray``: a sharded index's queries fan out
    to Ray actors, one per shard, on that cluster (``local``, ``local:N`` or an address); ``None``: to
    the shards in this process (``query/sharded_search.py``).
    """

    device: str = "auto"
    grn_checkpoint: Path | None = None
    shortlist: int = 1000
    san: bool = True
    san_checkpoint: Path | None = None
    saliency_checkpoint: Path | None = None
    fc_from_regions: int = 100_000
    san_candidates: int = 1000
    text_weight: float = TEXT_WEIGHT
    image_weight: float = 1.0
    layout_weight: float = LAYOUT_WEIGHT
    layout_shortlist: int = LAYOUT_SHORTLIST
    instance_shortlist: int = INSTANCE_SHORTLIST
    instance_head: Path | str | None = "instance-head"
    instance_weight: float = INSTANCE_WEIGHT
    concepts: bool = True
    concept_weight: float = CONCEPT_WEIGHT
    concept_gate: tuple[float, float] = CONCEPT_GATE
    san_gate: float = SAN_GATE
    text_projection: Path | str | None = "text-projection"
    projection_weight: float = PROJECTION_WEIGHT
    proposal_weight: float = PROPOSAL_WEIGHT
    san_weight: float = SAN_WEIGHT
    combined_san_weight: float = COMBINED_SAN_WEIGHT
    san_text_gate: tuple[float, float] = SAN_TEXT_GATE
    stage3: bool = True
    stage3_weights: Stage3Weights | None = None
    ref_nms_checkpoint: Path | None = None
    grounding_checkpoint: Path | str | None = None
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    features: RegionFeatureConfig = field(default_factory=RegionFeatureConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    ray: str | None = None

    def __post_init__(self) -> None:
        for name in ("text_weight", "image_weight", "layout_weight", "instance_weight", "concept_weight", "projection_weight", "proposal_weight", "san_weight", "combined_san_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= MAX_WEIGHT:
                raise InvalidInputError(f"--weight-{name.split('_')[0]} must be a finite number from 0 to {MAX_WEIGHT:g}, got {value!r}")
        for name in ("layout_shortlist", "instance_shortlist"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.san_gate, bool) or not isinstance(self.san_gate, (int, float)) or not math.isfinite(self.san_gate):
            raise InvalidInputError(f"san_gate must be a finite number (a cosine, -1 to 1), got {self.san_gate!r}")
        for name in ("concept_gate", "san_text_gate"):
            gate = getattr(self, name)
            if not (isinstance(gate, tuple) and len(gate) == 2 and all(isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) for g in gate) and gate[0] <= gate[1]):
                raise InvalidInputError(f"{name} must be two finite numbers (floor, ceiling) with floor <= ceiling, got {gate!r}")
        if self.text_weight == 0 and self.image_weight == 0:
            raise InvalidInputError("--weight-text and --weight-image are both 0: nothing would rank the hits; give one of them a positive weight")


@dataclass(frozen=True)
class IndexConfig:
    """One indexing run: where proposals come from, how many images per batch, how often FAISS is saved.

    ``maps``: a new index keeps each region's 7×7 RoI map (10,976 bytes a region: the conv GRN reads
    them in stage 2, stage 3 grounds with them). Without them (``engine index --no-maps``) an index
    takes ~1.1 KB a region (1.1 GB at a million regions): stage 2 uses ``grn-fc`` on the stored
    pooled means, and stage 3 computes the maps of the few images it grounds again from their files.
    An existing index keeps the arrays it was created with.

    ``shards``: create a sharded index of that many shards (``indexer/shards.py``; an existing sharded
    index keeps its own). ``ray``: extract the images' regions on Ray workers (``local`` or ``local:N``
    for a local cluster of N CPUs, else a cluster address) while this process commits them;
    ``ray_workers``: how many (default: one per CPU of the cluster). See ``engine/distributed/``.
    """

    proposals: str = "auto"
    batch_size: int = 8
    save_every: int = 2000
    maps: bool = True
    shards: int | None = None
    ray: str | None = None
    ray_workers: int | None = None
