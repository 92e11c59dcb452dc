"""The node's admin HTTP API (FastAPI): liveness, readiness, Prometheus metrics, JSON stats.

It runs on the node's own event loop, so it reads the live counters without locks; it never
touches stored values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kvcache.cachenode.stats import NodeCollector


def create_admin_app(
    collector: NodeCollector, snapshot: Callable[[], dict[str, Any]], ready: Callable[[], bool]
) -> FastAPI:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    app = FastAPI(title="kvcache node admin", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(response: Response) -> dict[str, str]:
        if ready():
            return {"status": "ready"}
        response.status_code = 503
        return {"status": "not ready"}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        return snapshot()

    return app
