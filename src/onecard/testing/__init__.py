"""Fixtures for tests and benchmarks: no weights can be downloaded, so onecard makes its own.

- ``make_random_checkpoint``: a complete HF folder from a real architecture's config, random weights;
- ``train_bpe_tokenizer``: a byte-level BPE tokenizer trained on local text, with a chat template;
- ``local_corpus``: real text every machine has (the Python standard library), split train/validation;
- ``train_tiny_model``: a ~5M-parameter Llama trained on that corpus, cached on disk.
"""

from onecard.testing.checkpoints import make_random_checkpoint
from onecard.testing.corpus import Corpus, local_corpus
from onecard.testing.tiny_model import TinyModelInfo, train_tiny_model
from onecard.testing.tokenizer import train_bpe_tokenizer

__all__ = ["Corpus", "TinyModelInfo", "local_corpus", "make_random_checkpoint", "train_bpe_tokenizer", "train_tiny_model"]
