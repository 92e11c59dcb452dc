"""What a joined engine's pods carry, written by the operator and read by the router: one
definition, so the two can never disagree."""

# The router's discovery selector (on joined Deployments and their pods).
CLUSTER_LABEL = "kvcache.io/cluster"
CLUSTER_NAMESPACE_LABEL = "kvcache.io/cluster-namespace"
# Where the router reaches the engine and its KV events (on joined engines' pods).
ENGINE_PORT_ANNOTATION = "kvcache.io/engine-port"
EVENTS_PORT_ANNOTATION = "kvcache.io/kv-events-port"
REPLAY_PORT_ANNOTATION = "kvcache.io/kv-replay-port"
# The data-parallel ranks the pod's engine runs ("0,1"): one routing target each, its events on
# the events port plus the rank, reached with the `X-data-parallel-rank` header.
DATA_PARALLEL_ANNOTATION = "kvcache.io/data-parallel-ranks"
ENGINE_PORT = 8000  # vLLM's default, when the engine's arguments name none
# The chunk-key salt of a joined engine's namespace (isolation Namespace), in its vLLM
# container's env: its connector keys chunks with it, the router reads it off the pod.
TENANT_SALT_ENV = "KVCACHE_TENANT_SALT"
