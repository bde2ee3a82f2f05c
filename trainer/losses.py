"""The two losses of SCIENCE.md: answer-token cross-entropy and the self-distillation KL.

Both work on next-token logits: position t predicts token t+1, so logits[:, :-1] pair with
labels[:, 1:]. `loss_positions` returns that shifted mask, so CE and KL agree on where they apply,
and `logits_at` runs the LM head on those positions only: with real vocabularies (10^5 entries)
the full [batch, time, vocab] logits would dominate a step's memory.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from trainer.tokenize import IGNORE
from trainer.vocab_chunks import kl_sum


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, T-1]: positions whose next token is an answer token."""
    return labels[:, 1:] != IGNORE


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over answer tokens of the batch (every answer token weighs the same)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def _has_plain_lm_head(model) -> bool:
    """True where logits are exactly lm_head(last hidden state): no softcapping or scaling."""
    config = model.config
    return (hasattr(model, "get_decoder") and model.get_output_embeddings() is not None
            and not getattr(config, "final_logit_softcapping", None)
            and getattr(config, "logit_scale", None) in (None, 1, 1.0))


@functools.cache
def cache_argument(module_class: type) -> str:
    """The name a model's or a decoder layer's forward takes its KV cache by: transformers 5.x
    renames `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(module_class.forward).parameters \
        else "past_key_values"


def _padding_mask_needed(attention_mask: torch.Tensor, where: torch.Tensor) -> bool:
    """False where every row's real tokens come before its padding and `where` reads real
    positions only: then causal attention alone gives those positions the same outputs."""
    left_or_inner = (attention_mask[:, 1:] > attention_mask[:, :-1]).any()
    reads_padding = (where & (attention_mask[:, : where.size(1)] == 0)).any()
    return bool(left_or_inner | reads_padding)


def _fed(input_ids: torch.Tensor, attention_mask: torch.Tensor, where: torch.Tensor,
         forward_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask) as the model is fed to read the positions `where`.

    Attention is causal, so the outputs at the first `width` positions depend on no token after
    them: those tokens are not fed (in training, every row's last column, 1/T of the forward).
    And where rows are padded on the right only, no real position attends to padding anyway, so
    when `where` reads real positions only (the loss's positions always do) and there is no KV
    cache, the padding mask is left out and attention takes its plain causal path: the same
    outputs there, without building a [B, 1, T, T] mask.
    """
    cut = input_ids.size(1) - where.size(1)
    if cut > 0:
        input_ids, attention_mask = input_ids[:, :-cut], attention_mask[:, :-cut]
    if not forward_kwargs and not _padding_mask_needed(attention_mask, where):
        return input_ids, None
    return input_ids, attention_mask


def hidden_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              where: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """The last hidden state [N, H] at the positions `where`, in row-major order: what the LM
    head reads, for a model with a plain one (`_has_plain_lm_head`). The last layer runs on the
    loss window only where the model allows it (`trainer.last_layer`)."""
    from trainer import last_layer

    input_ids, attention_mask = _fed(input_ids, attention_mask, where, forward_kwargs)
    decoder = model.get_decoder()
    cache = _plain_cache(attention_mask, forward_kwargs)
    if cache is not False and last_layer.supported(decoder):
        start = last_layer.window_start(where)
        if start >= last_layer.MIN_SAVED:
            return last_layer.windowed_hidden(decoder, input_ids, start,
                                              cache)[where[:, start:]]
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)[0]
    return hidden[where]


def _plain_cache(attention_mask: torch.Tensor | None, forward_kwargs: dict):
    """None where the forward has no KV cache and no padding mask; the cache where it has only
    a DynamicCache (its argument and use_cache) and a mask of ones; else False."""
    from transformers import DynamicCache

    given = {k: v for k, v in forward_kwargs.items() if k != "use_cache"}
    if attention_mask is not None and not bool(attention_mask.all()):
        return False
    if not given:
        return None if attention_mask is None else False
    cache = next(iter(given.values()))
    return cache if len(given) == 1 and type(cache) is DynamicCache else False


def logits_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              where: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """Next-token logits [N, V] at the positions `where` ([B, T-1] bool, or [B, T] where the last
    position counts too), in row-major order. `forward_kwargs` go to the model (a KV cache)."""
    if _has_plain_lm_head(model):
        return model.get_output_embeddings()(
            hidden_at(model, input_ids, attention_mask, where, **forward_kwargs))
    input_ids, attention_mask = _fed(input_ids, attention_mask, where, forward_kwargs)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits
    return logits[where]


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)), averaged over positions.

    Forward KL, teacher first (Hinton 2015; Li & Hoiem 2017). Both are [N, V] logits at the same
    N positions; `weights` [N], if given, multiplies each position's KL before the mean. Computed
    in float32 for stability under bf16, a few positions at a time (`trainer.vocab_chunks`), so
    no float32 [N, V] copy of the batch is made.
    """
    if student_logits.numel() == 0:
        return student_logits.sum() * 0.0
    total = kl_sum(student_logits, teacher_logits, temperature, weights=weights)
    return total / student_logits.size(0) * temperature**2
