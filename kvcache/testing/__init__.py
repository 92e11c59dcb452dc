"""Real stand-ins for what cannot run in a test: an instant OpenAI-compatible engine."""
