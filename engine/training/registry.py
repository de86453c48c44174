"""``engine train NAME``: the trainer of each model family of :mod:`engine.models.registry`.

:func:`train_model` looks ``NAME`` up in the model registry (a clear error lists the known names) and
calls its family's trainer; each trainer module is imported only then.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.models.registry import FAMILIES, family_of_name

if TYPE_CHECKING:
    from engine.models.checkpoint import Manifest
    from engine.training.options import TrainOptions

__all__ = ["TRAINERS", "INIT_FAMILIES", "MULTI_DATASET_FAMILIES", "WORD_FAMILIES", "train_model", "trains_on_several"]

Trainer = Callable[[str, "TrainOptions"], "Manifest"]

MULTI_DATASET_FAMILIES = frozenset({"rpn", "key-whitening", "text-projection", "instance-head"})  # families whose trainer reads every --data folder
INIT_FAMILIES = frozenset({"rpn"})  # families whose trainer can start from a checkpoint (--init)


def _rpn(name: str, options: TrainOptions) -> Manifest:
    from engine.training.rpn import train_rpn

    return train_rpn(options)


def _grn(name: str, options: TrainOptions) -> Manifest:
    from engine.training.grn import train_grn

    return train_grn(name, options)


def _saliency(name: str, options: TrainOptions) -> Manifest:
    from engine.training.saliency import train_saliency

    return train_saliency(options)


def _san(name: str, options: TrainOptions) -> Manifest:
    from engine.training.san import train_san

    return train_san(name, options)


def _mcb(name: str, options: TrainOptions) -> Manifest:
    from engine.training.mcb import train_mcb

    return train_mcb(name, options)


def _ref_nms(name: str, options: TrainOptions) -> Manifest:
    from engine.training.ref_nms import train_ref_nms

    return train_ref_nms(name, options)


def _cm_att(name: str, options: TrainOptions) -> Manifest:
    from engine.training.cm_att import train_cm_att

    return train_cm_att(name, options)


def _key_whitening(name: str, options: TrainOptions) -> Manifest:
    from engine.training.key_whitening import train_key_whitening

    return train_key_whitening(options)


def _text_projection(name: str, options: TrainOptions) -> Manifest:
    from engine.training.text_projection import train_text_projection

    return train_text_projection(options)


def _instance_head(name: str, options: TrainOptions) -> Manifest:
    from engine.training.instance_head import train_instance_head

    return train_instance_head(options)


TRAINERS: dict[str, Trainer] = {
    "rpn": _rpn,
    "grn-family": _grn,
    "saliency": _saliency,
    "san": _san,
    "mcb-attention": _mcb,
    "ref-nms": _ref_nms,
    "cm-att": _cm_att,
    "key-whitening": _key_whitening,
    "text-projection": _text_projection,
    "instance-head": _instance_head,
}
"""The trainer of each model family (by the family's manifest name)."""
assert set(TRAINERS) == {f.name for f in FAMILIES}, "every model family needs a trainer"


WORD_FAMILIES = frozenset({"grn-family", "san", "mcb-attention", "ref-nms", "cm-att"})
"""Families whose models read a text word by word: the ones ``--text-encoder`` (MiniLM or a vocabulary) applies to."""


def trains_on_several(name: str) -> bool:
    """Whether model ``name``'s trainer reads several dataset folders itself (else it trains on their union)."""
    return family_of_name(name).name in MULTI_DATASET_FAMILIES


def train_model(name: str, options: TrainOptions) -> Manifest:
    """Train the model ``name`` (one of :func:`engine.models.registry.model_names`) and write its checkpoint.

    Only the proposal network, the key whitening and the text projection train on several datasets at once (``options.extra_data``); any other model
    given more than one ``--data`` is a clear error rather than a silently ignored folder."""
    from engine.errors import InvalidInputError

    family = family_of_name(name).name
    if options.text_encoder != "minilm" and (family not in WORD_FAMILIES or name == "visual"):
        raise InvalidInputError(f"{name} reads no words, so --text-encoder {options.text_encoder} does not apply; leave it out (it applies to: {', '.join(sorted(WORD_FAMILIES))})")
    if options.init is not None and family not in INIT_FAMILIES:
        raise InvalidInputError(f"{name} cannot start from a checkpoint: --init applies to {', '.join(sorted(INIT_FAMILIES))} only")
    if options.extra_data and family not in MULTI_DATASET_FAMILIES:
        raise InvalidInputError(f"{name} trains on one dataset: give --data once (several --data folders work for: {', '.join(sorted(MULTI_DATASET_FAMILIES))})")
    return TRAINERS[family](name, options)
