"""Applications built on the engine: the demos, batch narrative generation (JSONL, Ray Data)."""
