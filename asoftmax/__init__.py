"""asoftmax: fast, certified softmax computation in JAX.

Subpackages:
  asoftmax.adaptive  AdaptiveSoftmax (Baharav et al., NeurIPS 2024): PAC top-k softmax of A x.
  asoftmax.rff       RF-softmax (Rawat et al., NeurIPS 2019): kernel-based sampled softmax.
  asoftmax.topk      Certified top-k attention (Tzachristas et al.): TV = tail mass.
  asoftmax.data      Offline data loaders (MNIST, EuroSAT, WikiText-2, PTB).
  asoftmax.models    Models (CNNs, Llama from GGUF, BERT from safetensors).
"""

__version__ = "0.1.0"
