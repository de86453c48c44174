"""Which stage-1 visual key finds the same real object again: same-object retrieval of real cut-outs.

Data (real, nothing synthetic but the placement): the Debian ``tuxpaint-stamps`` PNG cut-outs (alpha) and
real background photographs (skimage's chelsea / coffee / astronaut / rocket, scikit-learn's sample
images, OpenCV's example ``*.jpg``). Each stamp is pasted twice, on two different random background
crops, at different scales and positions (seeded); every image is 640×480, one stamp per image.

Protocol: a query is one instance's exact box; the gallery is every other instance of the same split;
R@1 / R@10 count the queries whose other instance (the same stamp) is ranked first / in the top 10 by
cosine similarity. Split by stamp key (path below the stamps folder, no extension):
``sha256(key) % 10`` in {0, 1} test, 2 val, else train. The PCA-whitening is fitted on train instances,
its dimension and shrinkage chosen on val; the chosen key is reported once on test.

Features come from ONE backbone pass per batch (levels c3, c4, c5 at max_size 640) and the engine's
own RoIAlign (``RegionFeatureExtractor.pool``, so boxes are mapped exactly as at index time).

    python benchmarks/visual_key.py [--stamps DIR] [--limit N] [--out benchmarks/results/visual-key.json]
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAMPS = Path("/tmp/deb/x/usr/share/tuxpaint/stamps")
OPENCV = Path("/tmp/deb/x/usr/share/doc/opencv-doc/examples/data")
W, H = 640, 480
LEVELS = ("c3", "c4", "c5")
SIZES = (7, 14)


def split_of(key: str) -> str:
    h = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10
    return "test" if h in (0, 1) else "val" if h == 2 else "train"


def backgrounds() -> list[Image.Image]:
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    out = [Image.fromarray(getattr(sd, n)()).convert("RGB") for n in ("chelsea", "coffee", "astronaut", "rocket")]
    out += [Image.fromarray(a).convert("RGB") for a in load_sample_images().images]
    for p in sorted(glob.glob(str(OPENCV / "*.jpg"))):
        try:
            im = Image.open(p).convert("RGB")
        except OSError:
            continue
        if min(im.size) >= 200:
            out.append(im)
    return out


def background_crop(bgs: list[Image.Image], rng: np.random.Generator, exclude: int = -1) -> tuple[Image.Image, int]:
    while True:
        i = int(rng.integers(len(bgs)))
        if i != exclude:
            break
    bg = bgs[i]
    bw, bh = bg.size
    frac = rng.uniform(0.5, 1.0)
    cw, ch = int(bw * frac), int(bh * frac)
    if cw * H > ch * W:
        cw = ch * W // H
    else:
        ch = cw * H // W
    x0, y0 = int(rng.integers(0, bw - cw + 1)), int(rng.integers(0, bh - ch + 1))
    return bg.crop((x0, y0, x0 + cw, y0 + ch)).resize((W, H), Image.BILINEAR), i


def paste(stamp: Image.Image, bg: Image.Image, rng: np.random.Generator, side: float) -> tuple[Image.Image, np.ndarray]:
    """``stamp`` (RGBA) scaled to longest side ``side`` at a random position; box = its alpha's bounding box."""
    sw, sh = stamp.size
    s = side / max(sw, sh)
    nw, nh = max(8, int(round(sw * s))), max(8, int(round(sh * s)))
    st = stamp.resize((nw, nh), Image.LANCZOS)
    x, y = int(rng.integers(0, W - nw + 1)), int(rng.integers(0, H - nh + 1))
    img = bg.copy()
    img.paste(st, (x, y), st)
    bbox = st.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox() or (0, 0, nw, nh)
    return img, np.array([x + bbox[0], y + bbox[1], x + bbox[2], y + bbox[3]], np.float64)


def build_instances(limit: int | None, seed: int) -> tuple[list[str], list[Image.Image], np.ndarray]:
    """Two instances per stamp: keys (one per instance), images, boxes ``[2N, 4]``."""
    rng = np.random.default_rng(seed)
    bgs = backgrounds()
    paths = sorted(STAMPS.rglob("*.png"))
    if limit:
        paths = [paths[i] for i in sorted(np.random.default_rng(seed).choice(len(paths), limit, replace=False))]
    keys, images, boxes = [], [], []
    for p in paths:
        try:
            stamp = Image.open(p).convert("RGBA")
        except OSError:
            continue
        if min(stamp.size) < 8 or stamp.getchannel("A").getbbox() is None:
            continue
        key = str(p.relative_to(STAMPS).with_suffix(""))
        sides = rng.uniform(90, 300, size=2)
        if abs(sides[0] - sides[1]) < 40:  # different scales
            sides[1] = sides[0] + 60 if sides[0] < 240 else sides[0] - 60
        used = -1
        for side in sides:
            bg, used = background_crop(bgs, rng, exclude=used)
            img, box = paste(stamp, bg, rng, float(side))
            keys.append(key)
            images.append(img)
            boxes.append(box)
    return keys, images, np.stack(boxes)


def extract(images: list[Image.Image], boxes: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    """Per instance, unnormalised pooled vectors ``{f"{level}:{size}:{pool}": [N, C]}`` from ONE backbone pass."""
    import torch

    from indexer.backbone import BackboneConfig, create_backbone, preprocess
    from indexer.region_features import RegionFeatureConfig, RegionFeatureExtractor

    backbone = create_backbone(BackboneConfig(max_size=640))
    pools = {(lv, s): RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig(level=lv, output_size=s)) for lv in LEVELS for s in SIZES}
    out: dict[str, list[np.ndarray]] = {}
    t0 = time.perf_counter()
    for start in range(0, len(images), batch):
        ims = images[start : start + batch]
        with torch.no_grad():
            x, _ = preprocess(ims, max_size=640)
            maps = backbone(x, levels=list(LEVELS))
            for (lv, s), ex in pools.items():
                pooled = ex.pool(maps[lv], [im.size for im in ims], [boxes[start + i][None] for i in range(len(ims))])
                out.setdefault(f"{lv}:{s}:mean", []).append(pooled.mean(dim=(2, 3)).numpy())
                gem = pooled.clamp_min(1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
                out.setdefault(f"{lv}:{s}:gem", []).append(gem.numpy())
        if start % 160 == 0:
            print(f"  {start + len(ims)}/{len(images)} images, {time.perf_counter() - t0:.0f} s", flush=True)
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def key_of(feats: dict[str, np.ndarray], levels: tuple[str, ...], size: int, pool: str) -> np.ndarray:
    """Per-level L2-normalised RoI vectors, concatenated, L2-normalised again."""
    return l2n(np.concatenate([l2n(feats[f"{lv}:{size}:{pool}"]) for lv in levels], axis=1))


def recall(vectors: np.ndarray, keys: list[str]) -> dict[str, float]:
    v = l2n(vectors)
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    k = np.asarray(keys)
    order = np.argsort(-sims, axis=1)
    hit = k[order] == k[:, None]
    first = hit.argmax(axis=1)
    return {"r1": float(np.mean(first < 1)), "r10": float(np.mean(first < 10)), "queries": int(len(k)), "gallery": int(len(k) - 1)}


class Whitening:
    def __init__(self, x: np.ndarray, dim: int, shrink: float) -> None:
        self.mean = x.mean(axis=0)
        cov = np.cov((x - self.mean).T)
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
        w, u = np.linalg.eigh(cov)
        idx = np.argsort(w)[::-1][:dim]
        self.proj = u[:, idx] / np.sqrt(np.maximum(w[idx], 1e-12))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return l2n((x - self.mean) @ self.proj)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="stamps sampled (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/visual-key-features.npz"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/visual-key.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    keys, images, boxes = build_instances(args.limit, args.seed)
    print(f"{len(keys)} instances of {len(set(keys))} stamps built in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.cache.is_file() and np.load(args.cache, allow_pickle=False)["n"] == len(keys):
        z = np.load(args.cache)
        feats = {k: z[k] for k in z.files if k != "n"}
    else:
        feats = extract(images, boxes)
        np.savez(args.cache, n=len(keys), **feats)
    split = np.array([split_of(k) for k in keys])
    sel = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    ks = np.asarray(keys)

    variants: dict[str, np.ndarray] = {}
    for levels in (("c4",), ("c5",), ("c3",), ("c4", "c5"), ("c3", "c4", "c5")):
        for size in SIZES:
            for pool in ("mean", "gem"):
                variants[f"{'+'.join(levels)} {pool} roi{size}"] = key_of(feats, levels, size, pool)
    variants["c4,c5 raw concat (no per-level L2) mean roi7"] = l2n(np.concatenate([feats["c4:7:mean"], feats["c5:7:mean"]], axis=1))
    rows = []
    for name, v in variants.items():
        row = {"key": name, "dim": int(v.shape[1])}
        for s in ("val", "test"):
            row[s] = recall(v[sel[s]], list(ks[sel[s]]))
        rows.append(row)
        print(f"{name:48s} dim {v.shape[1]:4d}  val R@1 {row['val']['r1']:.3f} R@10 {row['val']['r10']:.3f}  test R@1 {row['test']['r1']:.3f} R@10 {row['test']['r10']:.3f}", flush=True)

    # PCA-whitening on train instances of the best un-whitened candidates, chosen on val
    whitening = []
    for base in ("c4+c5 mean roi7", "c5 mean roi7", "c3+c4+c5 mean roi7"):
        v = variants[base]
        best = None
        for dim in (64, 128, 256, v.shape[1]):
            if dim > v.shape[1]:
                continue
            for shrink in (0.1, 0.3, 0.6):
                wt = Whitening(v[sel["train"]], dim, shrink)
                r = recall(wt(v[sel["val"]]), list(ks[sel["val"]]))
                if best is None or (r["r1"], r["r10"]) > (best[2]["r1"], best[2]["r10"]):
                    best = (dim, shrink, r)
        dim, shrink, rv = best
        rt = recall(Whitening(v[sel["train"]], dim, shrink)(v[sel["test"]]), list(ks[sel["test"]]))
        whitening.append({"key": f"{base} + PCA-whitening (train) d={dim} shrink={shrink}", "dim": dim, "val": rv, "test": rt})
        print(f"{whitening[-1]['key']:48s}  val R@1 {rv['r1']:.3f} R@10 {rv['r10']:.3f}  test R@1 {rt['r1']:.3f} R@10 {rt['r10']:.3f}", flush=True)

    result = {
        "what": "same-object retrieval of real cut-outs (tuxpaint stamps pasted twice on real photo crops); query = one instance's exact box, gallery = all other instances of the split",
        "data": {"stamps": str(STAMPS), "stamps_used": len(set(keys)), "instances": len(keys), "image_size": [W, H],
                 "split_instances": {s: int(len(i)) for s, i in sel.items()}, "seed": args.seed,
                 "split_rule": "sha256(key) % 10: {0,1} test, 2 val, else train; key = path below stamps folder without extension"},
        "backbone": "efficientnet_lite0@imagenet-tf, max_size 640, one pass for c3/c4/c5; RoIAlign sampling_ratio 2 (engine's RegionFeatureExtractor.pool)",
        "gem_p": 3,
        "rows": rows,
        "whitening": whitening,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
