"""The Kubernetes operator: the KVCacheCluster model and CRD, pure rendering of its children, the
engine injection, and the kopf handlers that apply them. Imports only `kvcache.core`, kopf and
aiohttp (the API calls and the nodes' /stats): no torch."""
