"""The per-project OpenFeature flag that chooses how session prompts are read."""
