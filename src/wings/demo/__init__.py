"""Building blocks of the embedded demo: a tiny base LLM, a tiny vision encoder, the time budget."""
