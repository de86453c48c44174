#!/usr/bin/env bash
# Reproduce the checkpoints shipped in engine/checkpoints/ (make-style: a step runs only when its
# output is missing; FORCE=1 reruns everything).
#
#   scripts/train_default_checkpoints.sh [DATA [STAMPS]]   # DATA defaults to data/synth, STAMPS to data/stamps
#   FORCE=1 ENGINE="python -m engine.cli" scripts/train_default_checkpoints.sh /tmp/synth
#
# Steps and the time they took on the 2-core development machine (CPU only, shared with other work,
# OMP_NUM_THREADS=1 — with several processes on 2 cores, one thread per process is several times faster):
#   1. engine synth: 1500 images of 320x320, seed 1                          ~20 s
#   2. backbone feature cache (built by the first `engine train`, reused)     ~3 min (1500 images, ~9 images/s)
#   2b. engine synth --world stamps: 3000 images of 512 px, seed 0            ~50 s (+ ~35 s `engine data fetch` once)
#   3. engine train rpn on both worlds: the anchor RPN (12 epochs of ~2.6 min from the cached maps, 3,308 train
#      images; 34 min on a loaded machine), then its box head (8 epochs of ~1.5 min, ~15 min) -> engine/checkpoints/rpn.pt.
#      The shipped file was made in two steps: the anchor RPN by this command without a box head (2026-12-06), then
#      `engine train rpn ... --init <that file>` (2026-12-08: the rank-64 box head, 8 epochs, 494 s); its manifest
#      records both (extra.init).
#   3b. engine train key-whitening on both worlds (keys of 356K boxes of the train images) ~4 min -> 0.75 MB
#   3c. engine train text-projection on both worlds (18,865 described regions, 30,778 background keys) ~2.5 min -> 0.67 MB
#   4. engine train grn (conv GRN)                                            ~8 min; the baselines and ablations
#      1-10 min each (times and metrics are in each engine/checkpoints/NAME.json manifest)
#   5. engine train saliency, then san on both worlds with MiniLM word features (25 min on a loaded machine:
#      ~10 min for the saliency-pooled maps of 4,500 images, 10 epochs of ~2 min; 1.3 MB), and its four
#      ablations on the shapes world with the vocabulary                       1.5 min, then 2-3 min each
#   6. engine train mcb and mcb-no-sparsity                                    6-7 min each
#   7. engine train ref-nms-b and ref-nms-r                                    ~12 min each alone (38-44 min with 4 jobs on 2 cores)
#   8. engine train cm-att and cm-att-erase                                    ~10-14 min each
set -euo pipefail

cd "$(dirname "$0")/.."
DATA="${1:-data/synth}"
STAMPS="${2:-data/stamps}"
ENGINE="${ENGINE:-engine}"
OUT="engine/checkpoints"
FORCE="${FORCE:-0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

need() {  # need FILE: true when FILE must be (re)made
    [[ "$FORCE" == 1 || ! -e "$1" ]]
}

step() {
    echo "+ $*" >&2
    local start=$SECONDS
    "$@"
    echo "  ($((SECONDS - start)) s)" >&2
}

if need "$DATA/annotations.jsonl"; then
    step $ENGINE synth "$DATA" --images 1500 --seed 1 --size 320 --quiet
fi

if need "$STAMPS/annotations.jsonl"; then
    step $ENGINE synth "$STAMPS" --world stamps --images 3000 --seed 0 --size 512 --quiet
fi

if need "$OUT/rpn.pt"; then
    step $ENGINE train rpn --data "$DATA" --data "$STAMPS" --out "$OUT/rpn.pt" --seed 0 --quiet
fi

# The visual key's PCA-whitening, fitted on the train splits' annotated boxes and the RPN's top 100
# proposals of each train image (so after the RPN); its shrinkage is chosen on the val splits.
if need "$OUT/key-whitening.pt"; then
    step $ENGINE train key-whitening --data "$DATA" --data "$STAMPS" --out "$OUT/key-whitening.pt" --seed 0 --quiet
fi

# The text projection (English -> the whitened visual key; docs/open-vocabulary.md): InfoNCE on the train
# splits' described regions, with the RPN's proposals as background, so after the RPN and the whitening.
if need "$OUT/instance-head.pt"; then
    step $ENGINE train instance-head --data "$DATA" --data "$STAMPS" --out "$OUT/instance-head.pt" --seed 0 --quiet
fi
if need "$OUT/text-projection.pt"; then
    step $ENGINE train text-projection --data "$DATA" --data "$STAMPS" --out "$OUT/text-projection.pt" --seed 0 --quiet
fi

# The first-wave models below that still ship their shapes-world vocabulary (`--text-encoder vocab`)
# are retrained on MiniLM word features one by one as each is measured to help (docs/open-vocabulary.md).
VOCAB=(--text-encoder vocab)

# The GRN and the rows of GRN Tables 2-5 (baselines and ablations); `visual` needs no training.
for method in grn vl-lstm vl-concat grn-no-residual grn-lstm grn-visual-residual grn-fc; do
    if need "$OUT/$method.pt"; then
        step $ENGINE train "$method" --data "$DATA" --out "$OUT/$method.pt" --seed 0 "${VOCAB[@]}" --quiet
    fi
done

# SAN (docs/san.md): stage 1 the saliency network (~1.5 min), stage 2 the full SAN and the ablation
# rows of SAN Tables 4-6 (~2-3 min each); SAN reads the saliency checkpoint, so it goes first.
if need "$OUT/saliency.pt"; then
    step $ENGINE train saliency --data "$DATA" --out "$OUT/saliency.pt" --seed 0 --quiet
fi
# The full SAN reads MiniLM word features and learns both worlds (text-only search fuses it with the open
# vocabulary, gated by its confidence); its ablation rows stay the shapes world's SAN Tables 4-6.
if need "$OUT/san.pt"; then
    step $ENGINE train san --data "$DATA" --data "$STAMPS" --out "$OUT/san.pt" --seed 0 --quiet
fi
for name in san-gv+gt san-sv+gt san-fv+gt san-fv+it; do
    if need "$OUT/$name.pt"; then
        step $ENGINE train "$name" --data "$DATA" --out "$OUT/$name.pt" --seed 0 "${VOCAB[@]}" --quiet
    fi
done

# MCB attention grounding (docs/mcb.md): trained from image-level phrase labels only; with and
# without the sparsity term (MCB paper Tables 1-2).
for name in mcb mcb-no-sparsity; do
    if need "$OUT/$name.pt"; then
        step $ENGINE train "$name" --data "$DATA" --out "$OUT/$name.pt" --seed 0 "${VOCAB[@]}" --quiet
    fi
done

# Ref-NMS relatedness (docs/ref-nms.md): binary XE (B) and ranking loss (R) on the RPN's proposals.
for name in ref-nms-b ref-nms-r; do
    if need "$OUT/$name.pt"; then
        step $ENGINE train "$name" --data "$DATA" --out "$OUT/$name.pt" --seed 0 "${VOCAB[@]}" --quiet
    fi
done

# CM-Att grounding (docs/cm-att.md): 10 epochs; cm-att-erase erases in the last 4; cm-att-erase-region is
# trained on region descriptions (objects and regions as candidates) for query stage 3.
for name in cm-att cm-att-erase cm-att-erase-region; do
    if need "$OUT/$name.pt"; then
        step $ENGINE train "$name" --data "$DATA" --out "$OUT/$name.pt" --seed 0 "${VOCAB[@]}" --quiet
    fi
done

$ENGINE models
