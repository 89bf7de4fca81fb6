"""The read shim: session prompts from legacy text or rendered templates, by the project's flag."""
