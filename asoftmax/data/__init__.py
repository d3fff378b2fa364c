"""Offline data readers: text for LMs (WikiText-2, PTB), MNIST (idx / tfds), EuroSAT (image folder / tfds).

optax's rule (issue 30): this `__init__` re-exports from the modules and holds the package's one `__all__`; every
name an experiment or a script uses is listed here (tests/test_api.py) and is in the bad-input registry
(tests/test_bad_input.py). Submodule imports (`from asoftmax.data import text`) keep working.
"""

from asoftmax.data.text import BUILTIN_TEXT, consecutive_chunks, make_windows, read_text, tokenize, wikitext_lines, words
from asoftmax.data.mnist import ImageSplits, load_mnist, read_idx
from asoftmax.data.eurosat import find_image_folder, load_eurosat, read_image_folder

__all__ = ["BUILTIN_TEXT", "ImageSplits", "consecutive_chunks", "find_image_folder", "load_eurosat", "load_mnist",
           "make_windows", "read_idx", "read_image_folder", "read_text", "tokenize", "wikitext_lines", "words"]
