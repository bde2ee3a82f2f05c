"""The decoder's last layer run only where its output is read: from the first loss position on.

In every layer but the last, a position's output feeds the next layer's keys and values at later
positions, so every position is needed. In the last layer a position's output feeds nothing but
the LM head, which reads the loss positions only: the answers, at the end of each row. So the last
layer needs keys and values at every position, but its queries, attention, output projection and
MLP only on the window from the first loss position of the batch to the end. The window runs
through the layer's own forward, with the prefix's keys and values given as its KV cache and an
explicit causal mask; only the prefix's keys and values (norm, k/v projections, rotary) are
computed here. On the built-in model a training row is ~23 tokens of which the last ~6 carry the
loss: the last layer is a quarter of the model, and most of it is skipped.

The same outputs at the window's positions as the whole forward (float summation order aside; a
test holds loss and gradients to the plain path), for decoders whose layers are known to take
this path: Llama-style attention (`SUPPORTED`) with full attention in every layer (no sliding
window), SDPA attention, no attention mask needed (right-padded rows read at real positions:
`trainer.losses._fed`), no gradient checkpointing (a checkpointed layer drops its KV cache) and
no dropout active in the last layer (a second call of its k/v projections would draw other
dropout masks than the plain path).
"""

from __future__ import annotations

import sys

import torch

from trainer.losses import cache_argument

SUPPORTED = frozenset({"llama", "qwen2"})  # same attention module shape, no q/k norms
MIN_SAVED = 4  # positions the window must skip to be worth a second code path


def _layers(decoder):
    return decoder.layers[: decoder.config.num_hidden_layers]


def supported(decoder) -> bool:
    config = decoder.config
    if config.model_type not in SUPPORTED or config._attn_implementation != "sdpa":
        return False
    layer_types = getattr(config, "layer_types", None)
    if any(t != "full_attention" for t in layer_types or ()):
        return False
    if not layer_types and getattr(config, "sliding_window", None) is not None:
        return False  # a KV cache built from this config keeps a window of keys only
    last = _layers(decoder)[-1]
    if getattr(last, "gradient_checkpointing", False):
        return False  # a checkpointed layer drops the KV cache it is given
    return not (last.training and (last.self_attn.attention_dropout > 0 or any(
        m.p > 0 for m in last.modules() if isinstance(m, torch.nn.Dropout))))


def window_start(where: torch.Tensor) -> int:
    """The first column of `where` [B, T] that any row reads."""
    return int(where.any(dim=0).int().argmax())


def _causal(queries: int, keys: int, first: int, device) -> torch.Tensor:
    """Bool mask [1, 1, queries, keys]: query i (at position first + i) sees keys 0..first+i."""
    seen = torch.arange(keys, device=device) <= torch.arange(first, first + queries,
                                                             device=device).unsqueeze(1)
    return seen[None, None]


def windowed_hidden(decoder, input_ids: torch.Tensor, start: int, cache=None) -> torch.Tensor:
    """The decoder's last hidden state [B, T - start, H] at columns start.. of `input_ids`
    (no padding mask: see the module's conditions, `supported`). `cache`: a DynamicCache of
    the tokens before `input_ids` (all rows alike), which is filled on as the plain forward
    would fill it."""
    from transformers import DynamicCache

    width, device = input_ids.size(1), input_ids.device
    past = cache.get_seq_length() if cache is not None else 0
    hidden = decoder.embed_tokens(input_ids)
    positions = torch.arange(past, past + width, device=device).unsqueeze(0)
    cos, sin = decoder.rotary_emb(hidden, position_ids=positions)
    *body, last = _layers(decoder)
    cache_kw = {} if cache is None else {cache_argument(type(last)): cache}
    body_mask = None if cache is None else _causal(width, past + width, past, device)
    for layer in body:
        hidden = layer(hidden, attention_mask=body_mask, position_ids=positions,
                       position_embeddings=(cos, sin), **cache_kw)
    # The last layer: keys and values of the prefix, as its attention module computes them ...
    attn = last.self_attn
    prefix = last.input_layernorm(hidden[:, :start])
    shape = (*prefix.shape[:-1], -1, attn.head_dim)
    keys = attn.k_proj(prefix).view(shape).transpose(1, 2)
    values = attn.v_proj(prefix).view(shape).transpose(1, 2)
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    # rotates queries and keys: a one-element "query" broadcasts, so only the keys cost
    _, keys = rotary(keys[:1, :1, :1], keys, cos[:, :start], sin[:, :start])
    cache = cache if cache is not None else DynamicCache(config=decoder.config)
    cache.update(keys, values, attn.layer_idx)
    # ... then the layer itself on the window: query w sees keys up to its own position.
    out = last(hidden[:, start:], attention_mask=_causal(width - start, past + width,
                                                         past + start, device),
               position_ids=positions[:, start:],
               position_embeddings=(cos[:, start:], sin[:, start:]),
               **{cache_argument(type(last)): cache})
    return decoder.norm(out)
