"""The last decoder layer on the loss window only (`trainer.last_layer`): the same outputs,
losses, gradients and KV cache as the whole forward, and the whole forward wherever the window
would not be exact."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from trainer import last_layer
from trainer.losses import hidden_at

torch.manual_seed(0)


def _qwen2():
    """A tiny Qwen2 (biases on q/k/v, grouped-query attention), randomly initialised."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=61, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attn_implementation="sdpa")
    return Qwen2ForCausalLM(config)


def _builtin(world, lora: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world / "model")
    if lora:
        from trainer.adapters import prepare_lora
        from trainer.spec import TrainSpec

        model = prepare_lora(model, TrainSpec.model_validate(
            {"method": {"type": "supervised"}, "adapter": {"type": "lora"}}))
        for name, p in model.named_parameters():  # a trained adapter, not B = 0
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    return model


def _batch(vocab: int, rows: int = 6, width: int = 14):
    """Right-padded rows of different lengths whose loss sits on their last 3-5 tokens."""
    ids = torch.randint(1, vocab, (rows, width))
    where = torch.zeros(rows, width - 1, dtype=torch.bool)
    for r in range(rows):
        end = width - (r % 3)  # rows end at different columns; padding after
        ids[r, end:] = 0
        where[r, end - 2 - (3 + r % 3): end - 1] = True
    return ids, (ids != 0).long(), where


def _both(model, ids, mask, where, monkeypatch):
    """(windowed, whole) hidden states at `where`, each with its gradients."""
    out = []
    for windowed in (True, False):
        model.zero_grad()
        with monkeypatch.context() as m:
            if not windowed:
                m.setattr(last_layer, "supported", lambda decoder: False)
            hidden = hidden_at(model, ids, mask, where)
        hidden.pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out.append((hidden.detach(), grads))
    return out


def _assert_same(windowed, whole):
    (h1, g1), (h0, g0) = windowed, whole
    assert h1.shape == h0.shape and torch.allclose(h1, h0, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g0.keys() and g0
    for name in g0:
        scale = g0[name].abs().max().clamp(min=1e-8)
        assert (g1[name] - g0[name]).abs().max() / scale < 1e-4, name


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_the_windowed_last_layer_gives_the_whole_forwards_outputs_and_gradients(
        builtin_world, monkeypatch, lora):
    model = _builtin(builtin_world, lora).train()
    assert last_layer.supported(model.get_decoder())
    ids, mask, where = _batch(model.config.vocab_size)
    assert last_layer.window_start(where[:, : ids.size(1) - 1]) >= last_layer.MIN_SAVED
    windowed, whole = _both(model, ids, mask, where, monkeypatch)
    _assert_same(windowed, whole)


def test_the_windowed_last_layer_on_qwen2_with_grouped_query_attention(monkeypatch):
    model = _qwen2().train()
    assert last_layer.supported(model.get_decoder())
    ids, mask, where = _batch(model.config.vocab_size)
    _assert_same(*_both(model, ids, mask, where, monkeypatch))


def test_after_a_kv_cache_the_window_fills_the_cache_as_the_whole_forward(builtin_world):
    """Scoring's verification pass: a shared head's keys and values first, then the rows."""
    model = _builtin(builtin_world, lora=False).eval()
    decoder = model.get_decoder()
    ids = torch.randint(1, model.config.vocab_size, (5, 12))
    head = torch.randint(1, model.config.vocab_size, (5, 3))
    start = 7
    caches, outs = [], []
    with torch.inference_mode():
        for windowed in (True, False):
            cache = DynamicCache(config=model.config)
            decoder(input_ids=head, cache=cache, use_cache=True)
            if windowed:
                outs.append(last_layer.windowed_hidden(decoder, ids, start, cache))
            else:
                outs.append(decoder(input_ids=ids, attention_mask=torch.ones(5, 15),
                                    cache=cache, use_cache=True)[0][:, start:])
            caches.append(cache)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert a.keys.shape == b.keys.shape == (5, 4, 15, 32)
        assert torch.allclose(a.keys, b.keys, atol=1e-5)
        assert torch.allclose(a.values, b.values, atol=1e-5)


def test_the_whole_forward_is_kept_where_the_window_would_not_be_exact(builtin_world):
    from transformers import MistralConfig, MistralForCausalLM

    small = dict(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4)
    windowed = MistralForCausalLM(MistralConfig(**small, sliding_window=6))
    assert not last_layer.supported(windowed.get_decoder())  # not a known layer shape
    from transformers import LlamaConfig, LlamaForCausalLM

    # Llama's attention ignores sliding_window, but a DynamicCache built from the config keeps
    # only that many keys: the prefix's would be cut (a review found the crash)
    llama_window = LlamaForCausalLM(LlamaConfig(**small, sliding_window=4))
    assert not last_layer.supported(llama_window.get_decoder())
    eager = _builtin(builtin_world, lora=False)
    eager.config._attn_implementation = "eager"  # wants an additive mask, not a bool one
    assert not last_layer.supported(eager.get_decoder())
    dropout = _qwen2()
    dropout.config.attention_dropout = 0.1
    for layer in dropout.get_decoder().layers:
        layer.self_attn.attention_dropout = 0.1
    assert not last_layer.supported(dropout.train().get_decoder())  # other random draws
    assert last_layer.supported(dropout.eval().get_decoder())  # no dropout at inference
    checkpointed = _builtin(builtin_world, lora=False)
    checkpointed.gradient_checkpointing_enable()
    assert not last_layer.supported(checkpointed.train().get_decoder())  # drops its cache
    ids, mask, where = _batch(61)
    where[:, 1] = True  # a loss position near the start: nothing worth skipping
    assert last_layer.window_start(where) < last_layer.MIN_SAVED
