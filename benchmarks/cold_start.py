"""Cold start of ``engine query``: where the seconds go before the first hit, by stage.

Each repeat runs in a fresh interpreter (nothing imported, nothing loaded) and times, in order:
the CLI's own import, ``engine.api``, opening the index, the backbone (torch's import included),
the query encode + stages 1–2 of a region-only query, the GRN, SAN and stage-3 models, and the first
combined query; then the same combined query once more (warm). Separately, the wall time of whole
``engine query`` command lines (region-only and combined) and of ``engine info``.

    python benchmarks/cold_start.py [--repeats 3] [--out benchmarks/results/cold-start.json]

The index is the demo's: 200 synthetic 320 px scenes, default (RPN) proposals, cached under
``benchmarks/.cache/``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS_DIR, IndexSpec, ensure_index  # noqa: E402

_PROBE = r"""
import json, sys, time
marks = {}
t0 = time.perf_counter()
def mark(name):
    global t0
    now = time.perf_counter(); marks[name] = round((now - t0) * 1000, 1); t0 = now
import engine.cli
mark("import engine.cli")
from engine.api import Engine
from engine.config import EngineConfig
mark("import engine.api")
index, image, region, text = sys.argv[1], sys.argv[2], [float(v) for v in sys.argv[3].split(",")], sys.argv[4]
engine = Engine(index, config=EngineConfig(device="cpu"))
engine.info()
mark("open index")
engine.extractor
mark("load backbone (imports torch)")
engine.search(image=image, region=region, k=10)
mark("region query: encode + stages 1-2")
engine.retrieval_model
mark("load GRN")
engine.san_encoder
mark("load SAN + saliency")
engine.grounding_models
mark("load stage 3 (Ref-NMS, CM-Att)")
engine.search(image=image, region=region, text=text, k=10)
mark("first combined query (stages 1-3)")
engine.search(image=image, region=region, text=text, k=10)
mark("warm combined query")
print(json.dumps(marks))
"""


def _median_marks(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: round(statistics.median(run[name] for run in runs), 1) for name in runs[0]}


def _wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "cold-start.json")
    args = parser.parse_args()

    corpus, index_dir = ensure_index(IndexSpec(images=200, seed=0, size=320, proposals="auto"))
    query = json.loads((corpus / "queries.jsonl").read_text().splitlines()[0])
    image, region, text = str(corpus / query["image"]), ",".join(str(v) for v in query["region"]), query["text"]
    stages = [json.loads(subprocess.run([sys.executable, "-c", _PROBE, str(index_dir), image, region, text], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]) for _ in range(args.repeats)]
    cli = [sys.executable, "-m", "engine.cli"]
    base = [*cli, "query", "--index", str(index_dir), "--device", "cpu", "--image", image, "--region", region, "--json"]
    result = {
        "index": {"images": 200, "size_px": 320, "proposals": "rpn"},
        "repeats": args.repeats,
        "stages_ms_median": _median_marks(stages),
        "cli_wall_ms_median": {
            "engine --help": _wall([*cli, "--help"], args.repeats),
            "engine info": _wall([*cli, "info", "--index", str(index_dir)], args.repeats),
            "engine models": _wall([*cli, "models"], args.repeats),
            "engine query (region)": _wall(base, args.repeats),
            "engine query (region + text, stage 3)": _wall([*base, "--text", text], args.repeats),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
