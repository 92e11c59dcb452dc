"""The operator's RBAC as the chart grants it, rule by rule, and the verb each API request needs.

tests/operator/test_chart.py checks that the chart's ClusterRole is exactly `OPERATOR_RULES`;
tests/operator/test_handlers.py checks every request the running operator makes against them.
Together: the chart grants what the operator calls. Each rule's reason is in the chart
(templates/rbac.yaml); a change here must be argued there.
"""

from __future__ import annotations

MANAGE = ["get", "list", "watch", "create", "patch", "delete"]
OPERATOR_RULES = [
    (["kvcache.io"], ["kvcacheclusters"], ["get", "list", "watch", "patch"]),
    (["kvcache.io"], ["kvcacheclusters/status"], ["get", "patch"]),
    (["kvcache.io"], ["kvcacheclusters/finalizers"], ["update"]),
    (["apps"], ["statefulsets", "deployments"], MANAGE),
    ([""], ["services", "serviceaccounts", "configmaps"], MANAGE),
    (["policy"], ["poddisruptionbudgets"], MANAGE),
    (["rbac.authorization.k8s.io"], ["roles", "rolebindings"], MANAGE),
    ([""], ["persistentvolumeclaims"], ["list", "patch"]),
    ([""], ["pods"], ["get", "list", "watch"]),
    ([""], ["events"], ["create"]),
    (["apiextensions.k8s.io"], ["customresourcedefinitions"], ["list", "watch"]),
]  # fmt: skip
# The verb a request needs, by its action (kmock's names) and, for updates, its HTTP method.
VERBS = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "DELETE": "delete"}
UPDATE_VERBS = {"PATCH": "patch", "PUT": "update"}


def granted(group: str, resource: str, verb: str) -> bool:
    """Whether a rule grants `verb` on `resource` (a subresource: `kvcacheclusters/status`)."""
    return any(
        group in groups and resource in resources and verb in verbs
        for groups, resources, verbs in OPERATOR_RULES
    )


def verb_of(action: str, method: str) -> str:
    return UPDATE_VERBS[method] if action == "UPDATE" else VERBS[action]
