"""Offline data loaders (text for LMs; others added by their owners)."""

from asoftmax.data.text import BUILTIN_TEXT, make_windows, read_text, tokenize
from asoftmax.data.mnist import ImageSplits, load_mnist, read_idx  # noqa: E402
from asoftmax.data.eurosat import load_eurosat, read_image_folder  # noqa: E402

__all__ = ["BUILTIN_TEXT", "ImageSplits", "load_eurosat", "load_mnist", "make_windows", "read_idx", "read_image_folder",
           "read_text", "tokenize"]
