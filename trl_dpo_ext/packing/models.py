"""Which models can run packed rows exactly, and the switch of SDPA models to the segment-wise kernel."""

from __future__ import annotations

from typing import Any

import torch

from .._trl_compat import attn_implementation as config_attn_implementation
from .attention import SEGMENT_SDPA, register_segment_sdpa
from .spec import PackingSpec


MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")  # take a custom 4D mask
VARLEN_PREFIX = "flash_attention"  # flash_attention_2, _3: sequences from `cu_seq_lens`, no custom mask


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attn_implementation(model) -> str | None:
    """The attention implementation of a model's text part (the one that runs the packed rows)."""
    return config_attn_implementation(text_config(model))


def check_model_supports_packing(
    model, name: str = "model", packing: PackingSpec | None = None, aux_loss_enabled: bool = False
) -> None:
    """Raise if `model` (a `PreTrainedModel` or a PEFT model around one) cannot run the packed forward exactly, or
    if a Mixture-of-Experts router loss is on (it reads a 2D attention mask)."""
    from accelerate.utils import is_peft_model

    packing = packing or PackingSpec(prefix_sharing=True)
    prefix_sharing, padding_free = packing.prefix_sharing, packing.padding_free
    feature = " and ".join(
        f for f, on in (("`prefix_sharing=True`", prefix_sharing), ("`padding_free=True`", padding_free)) if on
    )
    off = " and ".join(
        f for f, on in (("`prefix_sharing=False`", prefix_sharing), ("`padding_free=False`", padding_free)) if on
    )
    if aux_loss_enabled:
        raise NotImplementedError(
            f"{feature} does not support the router auxiliary loss of Mixture-of-Experts models yet (it reads a 2D "
            f"attention mask). Set `router_aux_loss_coef=0.0` or {off}."
        )
    if is_peft_model(model) and model.active_peft_config.is_prompt_learning:
        raise ValueError(
            f"{feature} cannot be used with the prompt-learning PEFT method of the {name} "
            f"({model.active_peft_config.peft_type}): its virtual tokens are not covered by the packed attention. "
            f"Use LoRA or another adapter method, or set {off}."
        )
    implementation = attn_implementation(model)
    varlen = implementation is not None and implementation.startswith(VARLEN_PREFIX)
    if varlen and prefix_sharing:
        raise ValueError(
            f"Prefix sharing needs an attention that takes a custom mask, one of {list(MASK_IMPLEMENTATIONS)}, but the "
            f"{name} uses `attn_implementation={implementation!r}`, which only separates whole sequences. Load it "
            "with `attn_implementation='sdpa'` (or 'flex_attention' on GPU), or set `prefix_sharing=False` (varlen "
            "flash attention then serves `padding_free=True`)."
        )
    if not varlen and implementation not in (*MASK_IMPLEMENTATIONS, SEGMENT_SDPA):
        supported = [*MASK_IMPLEMENTATIONS] + (
            ["flash_attention_2", "flash_attention_3"] if not prefix_sharing else []
        )
        raise ValueError(
            f"{feature} needs an attention implementation that keeps the packed sequences apart, one of {supported}, "
            f"but the {name} uses `attn_implementation={implementation!r}`. Load it with `attn_implementation='sdpa'` "
            f"(or 'flex_attention' on GPU), or set {off}."
        )
    if implementation == "flex_attention" and not torch.cuda.is_available():
        raise ValueError(
            f"The {name} uses `attn_implementation='flex_attention'`, which has no backward pass on CPU (torch "
            f"{torch.__version__}), so {feature} cannot train with it here. Load it with "
            "`attn_implementation='sdpa'`: on CPU the packed rows then run segment-wise SDPA."
        )
    config = text_config(model)
    layer_types = getattr(config, "layer_types", None) or []
    windowed = [t for t in set(layer_types) if t != "full_attention"]
    if not layer_types and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        windowed = ["sliding_attention"]
    if windowed:
        raise ValueError(
            f"{feature} replaces the attention mask of every layer, but the {name} has {sorted(windowed)} layers "
            f"whose own mask (a sliding window, chunks or linear attention) would be lost. Set {off} for this "
            "architecture."
        )


def use_segment_sdpa(model) -> None:
    """Switch an SDPA `model` to `SEGMENT_SDPA`: the same kernel on every ordinary forward, segment-wise on packed
    rows. Other implementations are left as they are. Not saved: `attn_implementation` is not part of a config."""
    from accelerate.utils import is_peft_model

    if attn_implementation(model) != "sdpa":
        return
    register_segment_sdpa()
    base = model.get_base_model() if is_peft_model(model) else model
    base.set_attn_implementation(SEGMENT_SDPA)


def check_packing_setup(packing: PackingSpec, data_collator, image_rows: bool) -> None:
    """Raise, before any work, for a run that could not pack: a given collator that does not pack what
    `prefix_sharing` or `padding_free` asks for, or `padding_free` with image rows."""
    if packing.prefix_sharing and data_collator is not None:
        if not getattr(data_collator, "prefix_sharing", False):
            raise ValueError(
                f"`prefix_sharing=True` needs a collator that packs each example's prompt once, but the given "
                f"{type(data_collator).__name__} does not (no `prefix_sharing=True`). Leave `data_collator=None` for "
                "the default one, pass `DataCollatorForMultiRejectedPreference(..., prefix_sharing=True)`, or set "
                "`prefix_sharing=False`."
            )
    if not packing.padding_free:
        return
    if data_collator is not None and not getattr(data_collator, "padding_free", False):
        raise ValueError(
            f"`padding_free=True` needs a collator that lays the batch in packed rows, but the given "
            f"{type(data_collator).__name__} does not (no `padding_free=True`). Leave `data_collator=None` for "
            "the default one, pass `DataCollatorForMultiRejectedPreference(..., padding_free=True)`, or set "
            "`padding_free=False`."
        )
    if image_rows:
        raise NotImplementedError(
            "`padding_free=True` is not supported for image rows yet (their image inputs are per sequence or per "
            "example). Set `padding_free=False`; `prefix_sharing=True` works with images."
        )


def prepare_packed_models(
    models: dict[str, Any], packing: PackingSpec, aux_loss_enabled: bool, image_rows: bool
) -> None:
    """Check every model (None skipped) for the packed forward, the policy's router loss too, and switch SDPA text
    models to the segment-wise kernel. Image rows keep the dense mask: a vision-language model's vision tower shares
    the attention setting, and the segment-wise kernel failed the LLaVA packed-forward test."""
    models = {name: model for name, model in models.items() if model is not None}
    for name, model in models.items():
        check_model_supports_packing(model, name, packing, aux_loss_enabled and name == "model")
    if not image_rows:
        for model in models.values():
            use_segment_sdpa(model)
