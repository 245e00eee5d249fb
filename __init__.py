"""kvtrie: a prefix-trie KV cache shared across LLM conversations, and the tools to trust it."""

__version__ = "0.1.0"
