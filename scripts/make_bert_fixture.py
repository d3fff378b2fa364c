"""Makes tests/fixtures/minilm_reference.npz: reference outputs of all-MiniLM-L6-v2 from PyTorch + transformers.

The reference implementation is not a project dependency. Re-run in a throwaway venv outside the repo:

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy
    /tmp/refenv/bin/python scripts/make_bert_fixture.py \
        --model_dir $(/work/main/.venv/bin/python -c "from asoftmax.models import bert; print(bert.minilm_dir())") \
        --out tests/fixtures/minilm_reference.npz

(Made once with torch 2.13.0+cpu, transformers 5.23.0, on CPU, float32, eager attention.)

It tokenizes SENTENCES with the checkpoint's tokenizer.json (padding to MAX_LEN, truncation on), runs
`transformers.BertModel` with output_hidden_states and output_attentions, and stores:
  input_ids, attention_mask (B, N) int32; last_hidden (B, N, D); hidden_3 (B, N, D) (output of layer 3);
  attentions (L, B, H, N, N) softmax probabilities; embedding (B, D) mean-pooled, L2-normalised (the
  sentence-transformers head of all-MiniLM-L6-v2: Pooling(mean) + Normalize, see modules.json).
"""

import argparse

import numpy as np

from asoftmax import results

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Certified top-k attention keeps only the keys that matter.",
    "Valkyria Chronicles III is a tactical role-playing game.",
]
MAX_LEN = 24


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model_dir", required=True)
  ap.add_argument("--out", required=True)
  a = ap.parse_args()
  import torch
  import transformers
  from tokenizers import Tokenizer

  tok = Tokenizer.from_file(f"{a.model_dir}/tokenizer.json")
  tok.enable_truncation(MAX_LEN)
  tok.enable_padding(length=MAX_LEN, pad_id=0, pad_token="[PAD]")
  enc = tok.encode_batch(SENTENCES)
  ids = np.array([e.ids for e in enc], np.int64)
  mask = np.array([e.attention_mask for e in enc], np.int64)
  model = transformers.BertModel.from_pretrained(a.model_dir, attn_implementation="eager", local_files_only=True).eval()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                token_type_ids=torch.zeros_like(torch.tensor(ids)),
                output_hidden_states=True, output_attentions=True)
  last = out.last_hidden_state.numpy()
  m = mask[..., None].astype(np.float32)
  emb = (last * m).sum(1) / m.sum(1)
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  with results.atomic_path(a.out, suffix=".npz") as tmp:
    np.savez_compressed(
        tmp, input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32), last_hidden=last,
        hidden_3=out.hidden_states[3].numpy(), attentions=np.stack([x.numpy() for x in out.attentions]),
        embedding=emb.astype(np.float32),
        versions=np.array(f"torch {torch.__version__}, transformers {transformers.__version__}"))
  print("wrote", a.out, "ids", ids.tolist())


if __name__ == "__main__":
  main()
