"""Our loop's LoRA Linear forward (`trainer.adapters.lean_lora_forward`): PEFT's outputs and
gradients, and PEFT's own forward wherever the lean one would not be the same computation."""

from __future__ import annotations

import copy

import pytest
import torch

from trainer.adapters import lean_lora_forward, prepare_lora
from trainer.spec import TrainSpec


def _spec(dropout: float = 0.0) -> TrainSpec:
    return TrainSpec.model_validate({"method": {"type": "supervised"},
                                     "adapter": {"type": "lora", "dropout": dropout}})


def _qwen2():
    """Biases on q/k/v (the base layer's bias goes through the lean path too)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _builtin(world):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(world / "model")


def _stock_and_lean(base, dropout: float = 0.0):
    torch.manual_seed(0)
    stock = prepare_lora(base, _spec(dropout))
    for name, p in stock.named_parameters():  # a trained adapter, not B = 0
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    lean = copy.deepcopy(stock)
    return stock, lean, lean_lora_forward(lean)


def _run(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


@pytest.mark.parametrize("family", ["builtin", "qwen2"])
def test_the_lean_forward_gives_peft_outputs_and_gradients(builtin_world, family):
    base = _builtin(builtin_world) if family == "builtin" else _qwen2()
    stock, lean, routed = _stock_and_lean(base)
    assert routed == 7 * base.config.num_hidden_layers  # q k v o gate up down in every layer
    ids = torch.randint(1, 60, (5, 9))
    (out0, g0), (out1, g1) = _run(stock, ids), _run(lean, ids)
    assert g1.keys() == g0.keys() and any("lora_A" in n for n in g0)
    if family == "builtin":  # no biases: the same products, so the same outputs bit for bit
        assert torch.equal(out1, out0)
    else:
        assert torch.allclose(out1, out0, atol=1e-5, rtol=1e-5)
    # Gradients to float32 rounding: a layer's input now sums its two gradients (base and
    # adapter) before the other layers' rather than all at once, in another order.
    for n in g0:
        assert (g1[n] - g0[n]).abs().max() <= 1e-5 * g0[n].abs().max().clamp(min=1e-8), n

def test_layers_the_lean_forward_cannot_serve_go_to_peft(builtin_world):
    # Dropout on the adapter's input: PEFT's forward draws it (the lean one has no dropout).
    _, lean, _ = _stock_and_lean(_builtin(builtin_world), dropout=0.5)
    lean.train()
    ids = torch.randint(1, 60, (2, 6))
    torch.manual_seed(1)
    first = lean(input_ids=ids).logits
    torch.manual_seed(2)
    assert not torch.equal(lean(input_ids=ids).logits, first)  # dropout ran

    # A hook on the base layer (as quantisation or offloading tools add) still fires.
    stock, lean, _ = _stock_and_lean(_builtin(builtin_world))
    seen = []
    layer = next(m for n, m in lean.named_modules() if n.endswith("q_proj.base_layer"))
    layer.register_forward_hook(lambda *_: seen.append(1))
    with torch.no_grad():
        out = lean(input_ids=ids).logits
        assert torch.equal(out, stock(input_ids=ids).logits)
    assert seen, "the base layer's hook was skipped"
