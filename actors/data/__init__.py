"""Ray Data stages of `raylm data`: reader, filters, language id, MinHash dedup, connected
components, shard tokenizer."""
