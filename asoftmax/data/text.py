"""Offline language-modelling text (WikiText-2, Penn Treebank) and next-token windows.

Files are read from a data directory (configs pass `config.data_dir`, which defaults to the env var
`ASOFTMAX_DATA_DIR`), laid out as in `shared/data`:

  <data_dir>/wikitext-2/wiki.{valid,test}.tokens   WikiText-2 v1, the *tokenized* release (with `<unk>`)
  <data_dir>/ptb/ptb.{valid,test}.txt              Penn Treebank, Mikolov's preprocessing

Note: AdaptiveSoftmax (Baharav et al., 2024, Table 2) used the *raw* WikiText-2 release; only the
tokenized one is available offline here, so our WikiText contexts contain `<unk>` and ` @-@ ` markers.

A *window* is `window` consecutive tokens (the context) followed by the target token; `make_windows`
spaces `n_windows` start positions evenly over the token stream (windows may overlap).
"""

from __future__ import annotations

import os

import numpy as np

from asoftmax import checks

DATASETS = ("wikitext", "ptb")
SPLITS = ("valid", "test")

_FILES = {
    "wikitext": {"valid": "wikitext-2/wiki.valid.tokens", "test": "wikitext-2/wiki.test.tokens"},
    "ptb": {"valid": "ptb/ptb.valid.txt", "test": "ptb/ptb.test.txt"},
}

# A short built-in text (written for this project, public domain) used by smoke runs and tests, so they
# need no data directory. Styled after WikiText: spaced punctuation.
BUILTIN_TEXT = (
    " = Softmax = \n \n"
    " The softmax function turns a vector of real numbers into a probability distribution . "
    "It is used at the output of neural networks that classify images , translate text , or predict "
    "the next word of a sentence . In a language model the vector holds one score for every word in "
    "the vocabulary , and the vocabulary may contain tens of thousands of words , so computing every "
    "score for every position is the most expensive step of the output layer . \n"
    " Adaptive sampling reads only a few coordinates of each score at first , and spends more effort "
    "on the words that might be the most likely next word . Words that are clearly unlikely are "
    "dropped early . The answer is correct with high probability , and the cost can be several times "
    "lower than the exact computation . \n \n"
    " = = History = = \n \n"
    " The name softmax was introduced in 1989 by John Bridle , who described it as a smooth version "
    "of the function that returns the largest value . The same formula appears much earlier in "
    "statistical mechanics , where it is known as the Boltzmann distribution , and in economics , "
    "where it describes the choices of people who compare several options . \n"
)


def text_path(data_dir: str, dataset: str, split: str) -> str:
  """Path of a dataset split under `data_dir` (not checked for existence)."""
  if dataset not in _FILES:
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
  if split not in _FILES[dataset]:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return os.path.join(data_dir or "", _FILES[dataset][split])


def read_text(data_dir: str, dataset: str, split: str = "test") -> str:
  """Reads a split as one string ('builtin' dataset: the short built-in text).

  Raises:
    FileNotFoundError: the file is absent; the message names the expected files and the env var.
  """
  if dataset == "builtin":
    return BUILTIN_TEXT
  path = text_path(data_dir, dataset, split)
  if not data_dir or not os.path.exists(path):
    expected = ", ".join(f"<data_dir>/{f}" for f in _FILES[dataset].values())
    raise FileNotFoundError(
        f"{dataset} {split} text not found at {path!r} (data_dir={data_dir!r}). Expected files: "
        f"{expected}. Set ASOFTMAX_DATA_DIR (e.g. ../shared/data) or --config.data_dir."
    )
  with open(path, encoding="utf-8") as f:
    return f.read()


def words(text: str) -> list[str]:
  r"""Whitespace words of `text` with `<eos>` at each line end (the PTB word-level LM convention).

  >>> words(" a b \n c\n")
  ['a', 'b', '<eos>', 'c', '<eos>']
  """
  out = []
  for line in checks.string("text", text).splitlines():
    out.extend(line.split() + ["<eos>"])
  return out


def wikitext_lines(text: str) -> list[str]:
  r"""Non-empty, non-heading lines of WikiText `.tokens` text, with the ` @-@ `-style joiners undone.

  >>> wikitext_lines(" = Title = \n\n A 3 @,@ 000 @-@ metre tower . \n")
  ['A 3,000-metre tower .']
  """
  out = []
  for line in checks.string("text", text).splitlines():
    s = line.strip()
    if not s or (s.startswith("=") and s.endswith("=")):
      continue
    out.append(s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", "."))
  return out


def tokenize(tokenizer, text: str) -> np.ndarray:
  """Token ids of `text` (no BOS/EOS added) as an int32 array."""
  checks.string("text", text)
  return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def make_windows(tokens: np.ndarray, n_windows: int, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Evenly spaced next-token windows from a token stream.

  Window i is `tokens[s_i : s_i + window]` with target `tokens[s_i + window]`, where
  `s_i = round(i * (N - window - 1) / (n_windows - 1))`.

  Args:
    tokens: (N,) int token stream.
    n_windows: number of windows (>= 1).
    window: context length (>= 1).

  Returns:
    (contexts, targets, starts): (n_windows, window) int32, (n_windows,) int32, (n_windows,) int64.

  Raises:
    ValueError: bad arguments, or fewer than `n_windows` distinct windows fit in the stream.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
  if n_windows < 1:
    raise ValueError(f"n_windows must be >= 1, got {n_windows}")
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  last = tokens.size - window - 1  # the largest valid start
  if last < 0 or last + 1 < n_windows:
    raise ValueError(
        f"n_windows: {n_windows} windows of {window}+1 tokens need a stream of at least "
        f"{window + n_windows} tokens, got {tokens.size}"
    )
  if n_windows == 1:
    starts = np.zeros(1, np.int64)
  else:
    starts = np.round(np.arange(n_windows) * (last / (n_windows - 1))).astype(np.int64)
  idx = starts[:, None] + np.arange(window)[None, :]
  return tokens[idx].astype(np.int32), tokens[starts + window].astype(np.int32), starts


def consecutive_chunks(tokens: np.ndarray, n_chunks: int, window: int) -> np.ndarray:
  """The first `n_chunks` non-overlapping (window + 1)-token chunks of a token stream.

  Chunk i is `tokens[i * window : (i + 1) * window + 1]`: positions 0..window-1 are the context and
  positions 1..window the next-token targets, so consecutive chunks cover the stream without overlap of
  targets (for training / evaluating a next-token model on every position).

  Args:
    tokens: (N,) int token stream.
    n_chunks: number of chunks (>= 1); 0 or None means as many as fit.
    window: context length (>= 1).

  Returns:
    (n_chunks, window + 1) int32.

  Raises:
    ValueError: bad arguments, or the stream is too short for `n_chunks` chunks.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  fit = (tokens.size - 1) // window
  if not n_chunks:
    n_chunks = fit
  if n_chunks < 1 or n_chunks > fit:
    raise ValueError(f"n_chunks: {n_chunks} chunks of {window}+1 tokens need at least {n_chunks * window + 1} "
                     f"tokens, the stream has {tokens.size} (at most {fit} chunks fit)")
  idx = np.arange(n_chunks)[:, None] * window + np.arange(window + 1)[None, :]
  return tokens[idx].astype(np.int32)
