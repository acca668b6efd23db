"""Shared fixtures: two tiny models built from configs (an encoder and a decoder) and a fixed batch.

Nothing here touches the network: the models are random, seeded, and built in milliseconds.
"""

from __future__ import annotations

import pytest
import torch
import transformers

SEED = 0
PAD_ID = 0


def bert_config(**overrides) -> transformers.BertConfig:
    values = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64, num_labels=2, pad_token_id=PAD_ID)
    return transformers.BertConfig(**{**values, **overrides})


def llama_config(**overrides) -> transformers.LlamaConfig:
    values = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_labels=2, pad_token_id=PAD_ID)
    return transformers.LlamaConfig(**{**values, **overrides})


FAMILIES = {
    "bert": (transformers.BertForSequenceClassification, bert_config),
    "llama": (transformers.LlamaForSequenceClassification, llama_config),
}


def build_model(family: str, seed: int = SEED, **config_overrides) -> torch.nn.Module:
    """A fresh tiny classifier; the same family and seed always give the same weights.
    Eval mode, so dropout is off and outputs are deterministic (gradients still flow)."""
    model_class, make_config = FAMILIES[family]
    torch.manual_seed(seed)
    return model_class(make_config(**config_overrides)).eval()


def make_batch() -> dict[str, torch.Tensor]:
    """Four right-padded sequences of length 8 (token 0 is padding) with balanced labels."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(1, 100, (4, 8), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate([8, 6, 5, 3]):
        input_ids[row, length:] = PAD_ID
        attention_mask[row, length:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 1, 1, 0])}


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    """Runs a test once on an encoder (BERT) and once on a decoder (Llama)."""
    return request.param


@pytest.fixture
def make_model(family):
    """A factory: every call returns a fresh copy of the same seeded base model."""
    return lambda **overrides: build_model(family, **overrides)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return make_batch()


@pytest.fixture
def single_thread():
    """Tiny models run fastest on one thread; on a busy machine, intra-op threads fighting over
    cores make them many times slower. Restores the previous setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
