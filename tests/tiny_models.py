"""Tiny random-initialised causal LMs built from configs, for editor and runtime tests.

Each builds in milliseconds and shares a small tokenizer-free vocabulary, so tests
feed token ids or use the character tokenizer in :mod:`tests.char_tokenizer`.
"""
