"""Serving many adapters at once: the adapter store, dynamic batching and the HTTP server.

The HTTP parts import fastapi and uvicorn (the ``serve`` extra) only when a server is built, so
``import adapterkit`` never needs them.
"""
