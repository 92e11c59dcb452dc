"""Reads the cache nodes' `/stats` (their admin HTTP port) for the cluster's status.

A node that does not answer in time (starting, stopping, gone) is left out of the figures, not
reported as an error: status shows what the nodes that answered hold. Reads run concurrently, so
one slow node costs one timeout, not one per node.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from kvcache.operator.names import ADMIN_PORT, ClusterRef
from kvcache.operator.observed import NodeUsage

TIMEOUT_S = 3.0


def stats_url(ref: ClusterRef, ordinal: int) -> str:
    """The node pod's stable DNS name, through the nodes' headless Service."""
    return f"http://{ref.nodes}-{ordinal}.{ref.nodes}.{ref.namespace}.svc:{ADMIN_PORT}/stats"


async def read_usage(
    ref: ClusterRef, ordinals: range, logger: logging.Logger
) -> tuple[NodeUsage, ...]:
    """The usage of every node in `ordinals` that answered."""
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        found = await asyncio.gather(
            *(_read(session, stats_url(ref, ordinal), logger) for ordinal in ordinals)
        )
    return tuple(usage for usage in found if usage is not None)


async def _read(
    session: aiohttp.ClientSession, url: str, logger: logging.Logger
) -> NodeUsage | None:
    try:
        async with session.get(url) as response:
            response.raise_for_status()
            return NodeUsage.from_stats(await response.json())
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        logger.debug("no stats from %s: %r", url, error)
        return None
