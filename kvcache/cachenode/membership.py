"""A node's membership in etcd: a lease, the node's record under it, and the keep-alive.

The node grants a lease of `lease_ttl_s`, writes its `MemberRecord` under that lease and refreshes
it every third of the TTL, so a node that dies (or hangs, or loses its network) drops out of every
client's ring within one TTL, while a live node rides out one or two lost refreshes. A lease that
expired anyway (etcd was unreachable for longer than the TTL) is granted afresh and the record is
written again. etcd being down never stops the node from serving: registration retries in the
background. On a graceful stop the lease is revoked, so clients drop the node at once instead of
waiting out the TTL.
"""

from __future__ import annotations

import asyncio
import logging

import aetcd

from kvcache.core.config import EtcdConfig
from kvcache.core.membership import MemberRecord, member_key

log = logging.getLogger(__name__)

RETRY_S = 0.5  # first retry after etcd failed; doubles per failure up to RETRY_MAX_S
RETRY_MAX_S = 5.0
# Each etcd call is given this long; a hung call must not outlive a lease refresh period.
CALL_TIMEOUT_S = 2.0


class MemberRegistration:
    def __init__(self, etcd: EtcdConfig, record: MemberRecord) -> None:
        self.etcd = etcd
        self.record = record
        self.key = member_key(etcd.cluster, record.node_id)
        self.registered = False
        self.registrations = 0  # leases granted and written: > 1 means the node re-registered
        self._client: aetcd.Client | None = None
        self._lease: aetcd.Lease | None = None

    async def run(self) -> None:
        """Register and keep the lease alive until cancelled."""
        refresh_s = max(0.2, self.etcd.lease_ttl_s / 3)
        retry_s = RETRY_S
        while True:
            try:
                if self._lease is None:
                    await self._register()
                    retry_s = RETRY_S
                    continue
                await asyncio.sleep(refresh_s)
                reply = await asyncio.wait_for(self._lease.refresh(), CALL_TIMEOUT_S)
                if reply is None or reply.TTL <= 0:
                    log.warning("lease of %s expired; registering again", self.record.node_id)
                    self._forget()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # etcd down, network, timeouts: retry, keep serving
                log.warning("etcd registration of %s: %s", self.record.node_id, error)
                self._forget()
                await self._close_client()
                await asyncio.sleep(retry_s)
                retry_s = min(2 * retry_s, RETRY_MAX_S)

    async def _register(self) -> None:
        if self._client is None:
            host, port = self.etcd.host_port
            self._client = aetcd.Client(host=host, port=port, timeout=CALL_TIMEOUT_S)
        lease = await asyncio.wait_for(self._client.lease(self.etcd.lease_ttl_s), CALL_TIMEOUT_S)
        await asyncio.wait_for(
            self._client.put(self.key, self.record.encode(), lease=lease), CALL_TIMEOUT_S
        )
        self._lease = lease
        self.registered = True
        self.registrations += 1
        log.info("registered %s in etcd under %s", self.record.node_id, self.key.decode())

    def _forget(self) -> None:
        self._lease = None
        self.registered = False

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception as error:  # closing a broken channel may fail; it is gone anyway
                log.debug("closing etcd client: %s", error)

    async def leave(self) -> None:
        """Revoke the lease (the record goes with it) so clients drop this node now."""
        lease = self._lease
        self._forget()
        if lease is not None:
            try:
                await asyncio.wait_for(lease.revoke(), CALL_TIMEOUT_S)
            except Exception as error:  # the lease then expires on its own within its TTL
                log.warning("revoking the lease of %s: %s", self.record.node_id, error)
        await self._close_client()
