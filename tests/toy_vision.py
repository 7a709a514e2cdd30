"""Offline tiny vision-language models: LLaVA, Qwen2.5-VL and Gemma 3 built from a config, with a local processor.

Nothing here downloads anything. Each processor pairs an image processor constructed from its arguments with the
character tokenizer of `trl_dpo_ext.quickstart` (plus the model's image tokens) and a ChatML template that renders
image parts, so that 16 × 16 images become 16 image tokens (LLaVA) or 4 (Qwen2.5-VL, Gemma 3). The tests and the vision
benchmark use these as TRL's tests use its `trl-internal-testing/tiny-*` checkpoints; they are not installed.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, ProcessorMixin

from trl_dpo_ext.quickstart import char_tokenizer


IMAGE_SIZE = 16
VLM_FAMILIES = ("llava", "qwen2_5_vl", "gemma3")
# The text each family's chat template writes for one image part (the processor expands it to the image's tokens)
IMAGE_PLACEHOLDERS = {
    "llava": "<image>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "gemma3": "<start_of_image>",
}
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
GEMMA3_VISION_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}


def vlm_chat_template(image_placeholder: str) -> str:
    """ChatML whose message contents may be a string or a list of `{"type": "text" | "image"}` parts."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image_placeholder + "{% else %}"
        "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def tiny_vlm_processor(family: str, image_size: int = IMAGE_SIZE) -> ProcessorMixin:
    """The processor of `tiny_vlm(family)`: a local image processor, the character tokenizer and a chat template.

    Images are resized to `image_size` × `image_size` (a multiple of 8), cut in 4 × 4 patches."""
    template = vlm_chat_template(IMAGE_PLACEHOLDERS[family])
    tokenizer = char_tokenizer(template)
    if family == "llava":
        from transformers import LlavaProcessor
        from transformers.models.clip import CLIPImageProcessorPil

        tokenizer.add_tokens(["<image>"], special_tokens=True)
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=4,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops
            chat_template=template,
        )
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer.add_tokens(list(QWEN_VISION_TOKENS), special_tokens=True)
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=image_size**2
        )
        return _image_only_qwen2_5_vl_processor(image_processor, tokenizer, template)
    if family == "gemma3":
        from transformers import Gemma3Processor, PreTrainedTokenizerFast
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        tokenizer.add_tokens(list(GEMMA3_VISION_TOKENS.values()), special_tokens=True)
        # Gemma3Processor reads the image tokens as named attributes of the tokenizer
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer.backend_tokenizer,
            **{name: getattr(tokenizer, name) for name in ("pad_token", "eos_token", "bos_token", "unk_token")},
            extra_special_tokens=GEMMA3_VISION_TOKENS,
        )
        tokenizer.chat_template = template
        image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
        return Gemma3Processor(image_processor, tokenizer, chat_template=template, image_seq_length=4)
    raise ValueError(f"Unknown family {family!r}, expected one of {list(VLM_FAMILIES)}.")


def _image_only_qwen2_5_vl_processor(image_processor, tokenizer, chat_template: str) -> ProcessorMixin:
    """`Qwen2_5_VLProcessor` without its video processor, which needs torchvision (not a dependency here)."""
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # Qwen2_5_VLProcessor.__init__ sets these four, then requires a video processor
            self.image_token, self.video_token = QWEN_VISION_TOKENS[1], QWEN_VISION_TOKENS[3]
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2_5_VLProcessor(image_processor, tokenizer, chat_template=chat_template)


def tiny_vlm(
    processor: ProcessorMixin,
    family: str,
    seed: int = 0,
    hidden_size: int = 32,
    image_size: int = IMAGE_SIZE,
    vision_hidden_size: int = 16,
    vision_layers: int = 2,
    **text_config,
) -> PreTrainedModel:
    """A randomly initialised LLaVA (CLIP + Llama), Qwen2.5-VL or Gemma 3 (SigLIP + Gemma 3) for `processor` (built
    with the same `image_size`); the same `seed` gives the same weights, in a fresh model, in float32.
    `text_config` overrides the text model's."""
    vision = dict(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size)
    tokenizer = processor.tokenizer
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    text.update(text_config)
    if family == "llava":
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        config = LlavaConfig(
            text_config={"model_type": "llama", **text},
            vision_config=dict(
                model_type="clip_vision_model",
                image_size=image_size,
                patch_size=4,
                num_hidden_layers=vision_layers,
                num_attention_heads=4,
                **vision,
            ),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
        model_class = LlavaForConditionalGeneration
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        ids = tokenizer.convert_tokens_to_ids
        head_dim = hidden_size // text["num_attention_heads"]
        mrope_section = [head_dim // 4, head_dim // 8, head_dim // 8]  # temporal, height, width; sums to head_dim / 2
        config = Qwen2_5_VLConfig(
            text_config={**text, "rope_parameters": {"rope_type": "default", "mrope_section": mrope_section}},
            vision_config=dict(
                depth=vision_layers,
                num_heads=4,
                **vision,
                out_hidden_size=hidden_size,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=16,
                fullatt_block_indexes=[vision_layers - 1],
            ),
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )
        model_class = Qwen2_5_VLForConditionalGeneration
    elif family == "gemma3":
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        config = Gemma3Config(
            text_config={"head_dim": hidden_size // text["num_attention_heads"], **text},
            vision_config=dict(
                model_type="siglip_vision_model",
                image_size=image_size,
                patch_size=4,
                num_hidden_layers=vision_layers,
                num_attention_heads=4,
                **vision,
            ),
            mm_tokens_per_image=4,  # the patches pooled to 2 × 2
            boi_token_index=tokenizer.boi_token_id,
            eoi_token_index=tokenizer.eoi_token_id,
            image_token_index=tokenizer.image_token_id,
            tie_word_embeddings=False,
        )
        model_class = Gemma3ForConditionalGeneration
    else:
        raise ValueError(f"Unknown family {family!r}, expected one of {list(VLM_FAMILIES)}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.float()


def vision_tower(model) -> torch.nn.Module:
    """The image encoder of a model built by `tiny_vlm` (LLaVA's and Gemma 3's `vision_tower`, Qwen2.5-VL's `visual`)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = inner.model
    return inner.vision_tower if hasattr(inner, "vision_tower") else inner.visual


def toy_image(seed: int, size: int = IMAGE_SIZE):
    """A `size` × `size` RGB image of seeded random pixels, so that different images give different features."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())
