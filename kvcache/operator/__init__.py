"""The Kubernetes operator: the KVCacheCluster model and CRD, pure rendering of its children,
and the engine injection. Imports only `kvcache.core` (and kopf in the handlers): no torch."""
