"""Build the open visual vocabulary's table, ``engine/checkpoints/concepts.npz`` (run once; shipped).

The backbone's ImageNet-1k classes are the engine's visual concepts. For each class this derives,
from WordNet 3.0 (Debian ``wordnet-base``: ImageNet's synset ids are WordNet 3.0 noun offsets) and
timm's ImageNet metadata (lemmas, definitions):

* its name (the synset's lemmas, "tiger, Panthera tigris") and its gloss ("... : large feline of
  forests in most of Asia having a tawny coat with black stripes");
* its hypernym ancestors (``@`` and ``@i`` pointers, transitively: tiger -> big cat -> feline ->
  carnivore -> placental -> mammal -> vertebrate -> chordate -> animal -> organism -> ... -> entity),
  so that "an animal", "a vehicle", "fruit" reach the classes below them;
* the all-MiniLM-L6-v2 sentence vectors of names, glosses and ancestor names (float16).

Usage: ``python scripts/build_concepts.py [--wordnet DIR] [--out engine/checkpoints/concepts.npz]``.
Without ``--wordnet`` the Debian package is fetched into the engine's data cache (``apt-get download``
+ ``dpkg -x``, as ``engine data fetch``).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.data_fetch import data_dir, fetch_data  # noqa: E402
from engine.models.minilm import MiniLMEncoder  # noqa: E402

WORDNET_PACKAGE = "wordnet-base"


def read_wordnet_nouns(path: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``data.noun`` -> (synset id ``n%08d`` -> lemmas, synset id -> direct hypernym ids)."""
    lemmas: dict[str, list[str]] = {}
    parents: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line or line.startswith(" "):  # the licence header lines start with two spaces
            continue
        fields = line.split(" | ", 1)[0].split()
        sid = "n" + fields[0]
        count = int(fields[3], 16)
        words = [fields[4 + 2 * i].replace("_", " ") for i in range(count)]
        at = 4 + 2 * count
        pointers = int(fields[at])
        ups = []
        for j in range(pointers):
            symbol, offset, pos = fields[at + 1 + 4 * j : at + 4 + 4 * j]
            if symbol in ("@", "@i") and pos == "n":
                ups.append("n" + offset)
        lemmas[sid] = [_clean(w) for w in words]
        parents[sid] = ups
    return lemmas, parents


def _clean(word: str) -> str:
    """WordNet marks adjective positions as ``word(a)``; drop the marker."""
    return word.split("(")[0]


def ancestors(sid: str, parents: dict[str, list[str]]) -> list[str]:
    """All hypernyms of ``sid`` (transitively), nearest first, each once."""
    seen: list[str] = []
    frontier = list(parents.get(sid, []))
    while frontier:
        nxt = []
        for p in frontier:
            if p not in seen:
                seen.append(p)
                nxt.extend(parents.get(p, []))
        frontier = nxt
    return seen


def read_timm_table(name: str) -> dict[str, str]:
    import timm.data

    path = Path(timm.data.__file__).parent / "_info" / name
    return dict(line.split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines() if "\t" in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, help="folder holding WordNet 3.0's data.noun (default: fetch Debian wordnet-base)")
    parser.add_argument("--out", type=Path, default=ROOT / "engine" / "checkpoints" / "concepts.npz")
    args = parser.parse_args()
    if args.wordnet is None:
        fetched = fetch_data(data_dir(), packages=(WORDNET_PACKAGE,), log=print)
        args.wordnet = fetched.dest / "root" / "usr" / "share" / "wordnet"
    data_noun = args.wordnet / "data.noun"
    if not data_noun.is_file():
        sys.exit(f"error: {data_noun} not found; pass --wordnet DIR (the folder of WordNet 3.0's data.noun)")
    lemmas, parents = read_wordnet_nouns(data_noun)
    import timm.data

    classes = (Path(timm.data.__file__).parent / "_info" / "imagenet_synsets.txt").read_text().split()
    definitions = read_timm_table("imagenet_synset_to_definition.txt")
    if len(classes) != 1000 or any(c not in lemmas for c in classes):
        sys.exit("error: timm's ImageNet-1k synsets do not match WordNet 3.0's noun offsets")
    names = [", ".join(lemmas[c]) for c in classes]
    glosses = [f"{n}: {definitions.get(c, '')}".rstrip(": ") for n, c in zip(names, classes)]
    class_ancestors = [ancestors(c, parents) for c in classes]
    nodes = sorted({a for anc in class_ancestors for a in anc})
    node_index = {a: i for i, a in enumerate(nodes)}
    node_names = [", ".join(lemmas[a]) for a in nodes]
    offsets = np.cumsum([0] + [len(a) for a in class_ancestors]).astype(np.int32)
    flat = np.asarray([node_index[a] for anc in class_ancestors for a in anc], np.int32)
    encoder = MiniLMEncoder()
    print(f"embedding {len(names)} class names, {len(glosses)} glosses, {len(nodes)} ancestor synsets ...")
    table = {
        "wnids": np.asarray(classes),
        "names": np.asarray(names),
        "glosses": np.asarray(glosses),
        "name_vectors": encoder.encode(names).astype(np.float16),
        "gloss_vectors": encoder.encode(glosses).astype(np.float16),
        "ancestor_wnids": np.asarray(nodes),
        "ancestor_names": np.asarray(node_names),
        "ancestor_vectors": encoder.encode(node_names).astype(np.float16),
        "ancestor_offsets": offsets,
        "ancestor_index": flat,
        "text_encoder": np.asarray(encoder.version),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp.npz")
    np.savez_compressed(tmp, **table)
    tmp.replace(args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()[:12]
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, sha256 {digest}): {len(classes)} classes, {len(nodes)} ancestors")


if __name__ == "__main__":
    main()
