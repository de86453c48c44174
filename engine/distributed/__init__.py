"""Running the engine on Ray: indexing work spread over workers, a sharded index searched by actors.

``ray_cluster.py`` connects (a local cluster started here, or an existing one by address);
``ray_indexing.py`` extracts images' regions on workers while the driver commits; ``ray_search.py``
holds one shard per actor for ``query/sharded_search.py``. Ray is an optional dependency
(``pip install 'engine[distributed]'``); without it ``--ray`` is a one-line error.
"""
