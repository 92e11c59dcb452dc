"""The prefix-aware OpenAI-API router: discovery, prefix index, scoring, proxy."""
