"""Performance benchmarks of the engine (``engine bench``, ``benchmarks/run_all.py``; docs/benchmarks.md).

One module per responsibility:

* :mod:`.seed` — the real seed corpus: generated, indexed by the real pipeline, its arrays and queries;
* :mod:`.synthetic` — indexes of any size through ``IndexStore.commit_images`` (seed + derived regions);
* :mod:`.latency` — combined-query latency through ``Engine.search``, and a per-stage breakdown;
* :mod:`.exhaustive` — exhaustive stage-2 scoring of every region, recall@k of the two-stage search;
* :mod:`.query_bench` — the above for one index size (``engine bench``);
* :mod:`.indexing` — indexing throughput and the shares of the pipeline's stages;
* :mod:`.faiss_tradeoff` — FAISS Flat vs the store's IVF choice vs IVF-PQ: recall and latency;
* :mod:`.storage` — disk per region by part; :mod:`.timing` — timers, percentiles, machine facts;
* :mod:`.report` — the markdown table of a results folder.
"""
