"""Models: Llama from GGUF (SmolLM2), and others added by their owners."""

from asoftmax.models.llama import (
    LlamaConfig,
    LlamaParams,
    hidden_states,
    last_hidden_state,
    load_gguf,
    load_smollm2,
    perplexity,
)
from asoftmax.models.bert import BertConfig, BertEncoder, encode as bert_encode, load_bert  # noqa: E402
from asoftmax.models.lm import FeatureHead, WordLSTM  # noqa: E402
from asoftmax.models.cnn import EuroSATCNN, MnistCNN  # noqa: E402
from asoftmax.models.cache_attention import QuantizedKVAttention, SketchCacheAttention, prepare_cache  # noqa: E402

__all__ = [
    "BertConfig", "BertEncoder", "EuroSATCNN", "FeatureHead", "LlamaConfig", "LlamaParams", "MnistCNN",
    "QuantizedKVAttention", "SketchCacheAttention", "WordLSTM", "bert_encode", "hidden_states", "last_hidden_state",
    "load_bert", "load_gguf", "load_smollm2", "perplexity", "prepare_cache",
]
