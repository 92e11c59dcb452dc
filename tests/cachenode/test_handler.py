"""The request handler over a memory tier, without sockets."""

from __future__ import annotations

from kvcache.cachenode.handler import RequestHandler
from kvcache.cachenode.memory_tier import MemoryTier
from kvcache.cachenode.stats import NodeStats
from kvcache.core.protocol import Limits, Op, Request, ValueInfo, decode_header, parse_reply


def test_a_get_reply_carries_at_most_max_request_bytes_and_misses_the_rest():
    limits = Limits(max_request_bytes=250)
    tier = MemoryTier(1 << 20)
    stats = NodeStats()
    handler = RequestHandler("n", tier, stats, limits)
    keys = [bytes([i]) * 32 for i in range(4)]
    for key in keys:
        tier.put(key, [b"x" * 100], ValueInfo(100, 1, 0))
    request = Request(Op.GET, 9, keys)
    header, *frames = handler.handle([request.encode()])
    reply = parse_reply(decode_header(header), [len(f) for f in frames], request, limits)
    assert [info is not None for info in reply.values] == [True, True, False, False]
    assert len(frames) == 2
    assert (stats.hits, stats.misses, stats.bytes_sent) == (2, 2, 200)
