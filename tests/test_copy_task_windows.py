"""The speculative benchmark's copy-model training: windows start at edit pairs (``pair_starts``), and ``train_lm``
draws its windows only from the offsets it is given."""

from __future__ import annotations

import pytest
import torch

from onecard.testing.checkpoints import build_random_model
from onecard.testing.train_lm import train_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("engine_speculative")


def test_pair_starts_are_the_pairs_with_a_whole_window_after_them(bench):
    encoded = [([5] * 3, [6] * 4), ([7] * 2, [8] * 2), ([9] * 6, [10] * 1), ([11], [12])]  # pairs of 8, 5, 8, 3 tokens
    stream = bench.pair_stream(encoded, eos=2)
    starts = bench.pair_starts(encoded, seq_len=6)
    assert starts.tolist() == [0, 8, 13]  # the last pair (at 21) has no 7 tokens after it
    assert [stream[s].item() for s in starts] == [5, 7, 9]


def test_train_lm_windows_start_only_at_the_given_offsets():
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 128,
           "max_position_embeddings": 64, "tie_word_embeddings": False}
    model = build_random_model(cfg)
    stream = torch.arange(100) % 128
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.extend(kwargs["input_ids"][:, 0].tolist()),
                                    with_kwargs=True)
    train_lm(model, stream, steps=6, seq_len=8, batch_size=4, lr=1e-3, generator=torch.Generator().manual_seed(0),
             window_starts=torch.tensor([3, 40, 71]))
    assert len(seen) == 24 and set(seen) <= {3, 40, 71} and len(set(seen)) > 1
