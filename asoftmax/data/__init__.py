"""Offline data loaders (text for LMs; others added by their owners)."""

from asoftmax.data.text import BUILTIN_TEXT, make_windows, read_text, tokenize
