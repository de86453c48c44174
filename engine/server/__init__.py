"""``engine serve``: an HTTP API (FastAPI + uvicorn) over one :class:`engine.api.Engine`.

Modules, one concern each: :mod:`settings` (limits, token, corpus root), :mod:`schemas` (request bodies),
:mod:`errors` (engine errors → one-line JSON errors with an HTTP status), :mod:`service` (the shared
reader ``Engine``, one call at a time), :mod:`jobs` (indexing in a background thread with its own
writer ``Engine``), :mod:`uploads` (size and pixel limits of uploaded images), :mod:`media` (region
crops), :mod:`app` (the ``create_app`` factory and its routes) and :mod:`client` (``engine query
--server``: the standard library's urllib, no FastAPI). Importing this package imports none of them.
"""
