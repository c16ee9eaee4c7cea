"""The chunk engine shared by the chunkwise forms, and the chunk summaries built on it
(summary.py: what a span of tokens does to its entering state, for context parallelism)."""
