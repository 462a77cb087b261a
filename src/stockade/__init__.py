"""stockade: local-first sandbox runtime for AI agents."""
