"""What trains: LoRA through peft or the full model, narrowed to parameter groups on request.

Groups are recognised by module names, which covers Llama-, Mistral-, Qwen-, Gemma-, Phi-3-
(fused qkv_proj / gate_up_proj) and GPT-2-style (Conv1D) models: a norm is a norm whatever block it
sits in, so norms are matched before attention. tests/trainer/test_zoo.py shows what each group
selects in each family.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from trainer.modelfacts import check_tied_selection, embeddings_are_tied
from trainer.spec import AdapterSpec, FrozenGroupsHyperparameters, TrainSpec

_LAYER = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")
_GROUP_PATTERNS = (  # first match wins
    ("norms", re.compile(r"(^|[._])(norm|ln_\w*|\w*layernorm|\w*layer_norm)(\.|$)")),
    ("lm_head", re.compile(r"(^|\.)(lm_head|embed_out)(\.|$)")),
    ("embeddings",
     re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|embed_positions)(\.|$)")),
    ("attention", re.compile(r"(^|\.)(self_attn|attn|attention)(\.|$)")),
    ("mlp", re.compile(r"(^|\.)(mlp|feed_forward|ffn)(\.|$)")),
)


def group_of(name: str) -> str | None:
    for group, pattern in _GROUP_PATTERNS:
        if pattern.search(name):
            return group
    return None


def layer_of(name: str) -> int | None:
    m = _LAYER.search("." + name + ".")
    return int(m.group(1)) if m else None


def is_selected(name: str, groups: set[str], layers: tuple[int, int] | None) -> bool:
    """Does the parameter or module `name` belong to the trainable groups (and layer range)?"""
    if group_of(name) not in groups:
        return False
    layer = layer_of(name)
    return layers is None or layer is None or layers[0] <= layer <= layers[1]


def frozen_groups_of(spec: TrainSpec) -> FrozenGroupsHyperparameters | None:
    hp = spec.method.hyperparameters
    return hp if isinstance(hp, FrozenGroupsHyperparameters) else None


def prepare_full(model, spec: TrainSpec):
    """Full fine-tuning; with frozen_groups, everything outside the groups keeps
    requires_grad off."""
    fg = frozen_groups_of(spec)
    if fg is not None:
        check_tied_selection(embeddings_are_tied(model), fg.groups(), "full")
    for name, p in model.named_parameters():
        p.requires_grad_(fg is None or is_selected(name, fg.groups(), fg.layer_range()))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("frozen_groups selects no parameter of this model")
    return model


def lora_config(model, adapter: AdapterSpec, spec: TrainSpec):
    from peft import LoraConfig

    fg = frozen_groups_of(spec)
    targets: str | list[str] = adapter.target_modules
    modules_to_save = None
    if fg is not None:
        groups, layers = fg.groups(), fg.layer_range()
        from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

        lora_types = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
        names = [n for n, m in model.named_modules()
                 if isinstance(m, lora_types) and is_selected(n, groups - {"norms"}, layers)]
        if isinstance(adapter.target_modules, list):
            names = [n for n in names if n.split(".")[-1] in adapter.target_modules]
        norms = [n for n, m in model.named_modules() if n and not list(m.children())
                 and group_of(n) == "norms" and is_selected(n, groups, layers)]
        if not names and not norms:
            raise ValueError("frozen_groups selects no module of this model")
        if not names:  # PEFT refuses an adapter whose every module is saved whole
            raise ValueError("frozen_groups selects only norms, which have no LoRA form: use "
                             "adapter type 'full' to train norms alone, or add a group with "
                             "linear layers (attention, mlp)")
        # Norms have no LoRA form: they train whole, saved beside the adapter.
        targets = "^(" + "|".join(re.escape(n) for n in names) + ")$"
        modules_to_save = norms or None
    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=targets, modules_to_save=modules_to_save,
                      task_type="CAUSAL_LM", bias="none")


def prepare_lora(model, spec: TrainSpec, adapter_name: str = "default"):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, spec.adapter, spec), adapter_name=adapter_name)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _lora_linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA Linear forward for the plain case, as three matrix products on the tokens
    flattened to rows: base(x) + s * (x A^T) B^T, with the adapter's scaling and sum folded into
    one addmm. PEFT computes B's output, multiplies it by s and adds it to base(x): two more
    passes over a [tokens x out_features] tensor each way, which on the CPU cost more than the
    adapter's matmuls (autograd through addmm scales the [tokens x r] side instead). And a
    linear layer fed [batch, time, features] folds and unfolds them around its product: views
    that each cost an op and an autograd node, three times per layer per step; flattened once
    here, they went from ~5% of a training step on the built-in model. Anything else (adapters
    off or merged, several active, dropout, a variant such as DoRA, a bias on B, a base layer
    that is not a plain hook-free Linear, extra arguments) goes to PEFT's own forward."""
    from peft.tuners.lora.layer import Linear

    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    base = self.base_layer
    if (name is None or args or kwargs or self.disable_adapters or self.merged
            or name not in self.lora_A or name in self.lora_variant
            or self.lora_B[name].bias is not None
            or not isinstance(self.lora_dropout[name], torch.nn.Identity)
            or type(base) is not torch.nn.Linear or base._forward_hooks
            or base._forward_pre_hooks
            or (x.dtype != self.lora_A[name].weight.dtype and not torch.is_autocast_enabled())):
        return Linear.forward(self, x, *args, **kwargs)
    rows = x.reshape(-1, x.size(-1))
    result = F.linear(rows, base.weight, base.bias)
    out = torch.addmm(result, F.linear(rows, self.lora_A[name].weight),
                      self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return out.view(*x.shape[:-1], out.size(-1))


def lean_lora_forward(model) -> int:
    """Route the model's LoRA Linear layers through `_lora_linear_forward` (the same outputs:
    bit for bit in float32 on the built-in model, gradients to float32 rounding, ~10% of a
    training step there; under CUDA autocast one addmm rounds once where PEFT rounds three
    times, so the last bits differ).
    Returns how many. Only our loop's models: the bench's peers keep stock PEFT."""
    import types

    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if type(m) is Linear]  # subclasses keep their own
    for layer in layers:
        layer.forward = types.MethodType(_lora_linear_forward, layer)
    return len(layers)
