# One image for every kvcache component; the entrypoint is the `kvcache` command:
#   cache node:  kvcache node --node-id ... (the operator renders the flags)
#   router:      kvcache router ...
#   operator:    kopf run --all-namespaces --standalone -m kvcache.operator.handlers
#                (the Helm chart sets this command)
# The engines run in vLLM's own image with `pip install kvcache[engine]`; this one holds no torch.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvcache ./kvcache
# The `operator` extra brings kopf; transformers lets the router tokenize requests exactly as the
# engines do (spec.router.tokenizer), without torch.
RUN pip install ".[operator]" "transformers>=4.56,<5.20" \
    && rm -rf /src

# The unprivileged user the operator's pods run as (runAsUser 10001, read-only root filesystem).
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kvcache
USER 10001:10001
WORKDIR /tmp

ENTRYPOINT ["kvcache"]
CMD ["--help"]
