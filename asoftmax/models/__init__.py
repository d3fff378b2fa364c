"""Models: Llama from GGUF (SmolLM2) with a KV cache, BERT (MiniLM), the CNN / ResNet classifiers and their training,
the LM heads, and the hidden-state cache.

optax's rule (issue 30): this `__init__` re-exports from the modules and holds the package's one `__all__`; every
name an experiment or a script uses is listed here (tests/test_api.py) and is in the bad-input registry
(tests/test_bad_input.py). Submodule imports (`from asoftmax.models import llama`) keep working.
"""

from asoftmax.models.llama import (
    DenseCacheAttention,
    LlamaCache,
    LlamaConfig,
    LlamaParams,
    decode_step,
    hidden_states,
    hidden_states_with_attention,
    init_cache,
    last_hidden_state,
    load_gguf,
    load_smollm2,
    params_from_tensors,
    perplexity,
    prefill,
)
from asoftmax.models.gguf_loader import read_gguf, read_metadata, smollm2_available, smollm2_path
from asoftmax.models.bert import (
    BertConfig,
    BertEncoder,
    encode as bert_encode,
    load_bert,
    pack_token_ids,
    sentence_embedding,
    tokenize as bert_tokenize,
)
from asoftmax.models.lm import FeatureHead, WordLSTM
from asoftmax.models.cnn import EuroSATCNN, MnistCNN
from asoftmax.models.resnet import EuroSATResNet
from asoftmax.models.train import accuracy, extract_features, load_params, save_params, train_classifier, train_or_load
from asoftmax.models.hidden_cache import cached_hidden_states
from asoftmax.models.cache_attention import QuantizedKVAttention, SketchCacheAttention, prepare_cache

__all__ = [
    "BertConfig", "BertEncoder", "DenseCacheAttention", "EuroSATCNN", "EuroSATResNet", "FeatureHead", "LlamaCache",
    "LlamaConfig", "LlamaParams", "MnistCNN", "QuantizedKVAttention", "SketchCacheAttention", "WordLSTM", "accuracy",
    "bert_encode", "bert_tokenize", "cached_hidden_states", "decode_step", "extract_features", "hidden_states",
    "hidden_states_with_attention", "init_cache", "last_hidden_state", "load_bert", "load_gguf", "load_params",
    "load_smollm2", "pack_token_ids", "params_from_tensors", "perplexity", "prefill", "prepare_cache", "read_gguf",
    "read_metadata", "save_params", "sentence_embedding", "smollm2_available", "smollm2_path", "train_classifier",
    "train_or_load",
]
