"""Data formats the stages read and write: JSONL, chat templates, SFT conversations, preference
pairs, token shards, the tokenizer and the embedded standard-library corpus."""
