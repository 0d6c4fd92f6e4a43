"""The API under a real uvicorn server in a thread (one process, real sockets, its
own thread pool), as clients reach it in production: :func:`serve` (bench/_chaos.py
has the one implementation, shared with the chaos benchmark)."""

from bench._chaos import serve

__all__ = ["serve"]
