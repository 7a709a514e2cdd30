"""Preference rows with images: one chosen and K rejected, each scored against the same prompt and image(s).

An image row is a preference row (standard or conversational, see `trl_dpo_ext.data`) with an `images` column (a
list of images) or an `image` column (one image), exactly as `trl.DPOTrainer` takes it; `rejected` may be a list:

    {"images": [img], "prompt": [{"role": "user", "content": "What is shown?"}],
     "chosen": [{"role": "assistant", "content": "A cat."}],
     "rejected": [[{"role": "assistant", "content": "A dog."}], [{"role": "assistant", "content": "Nothing."}]]}

As in TRL, image rows are not tokenized up front (turning every image into pixel values would be slow and large):
the collator renders and processes each batch. It follows TRL's `DataCollatorForVisionPreference` step by step
(images placed into the prompt's first user message, the chat template, the prompt processed with its images and
left-padded, each response tokenized on its own), so that rows with one rejected give TRL's batch, and it lays the
B + Σ K_i sequences out as `DataCollatorForMultiRejectedPreference` does for text.

- Unshared forward: the image inputs (`pixel_values`, `image_grid_thw`, ...) are repeated once per sequence, as TRL
  repeats them for its chosen and rejected halves: the vision encoder sees each image K + 1 times.
- `prefix_sharing=True`: the image tokens are part of the prompt, which the packed row holds once
  (`trl_dpo_ext.packing`); the image inputs are given once per example, so the vision encoder runs once for
  the chosen and all K rejected. Per-token processor outputs (`token_type_ids`, `mm_token_type_ids`) are packed like
  `input_ids`, and models with multimodal 3D RoPE positions (Qwen2.5-VL) get them for the packed row.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from datasets import Dataset
from transformers import ProcessorMixin
from trl import apply_chat_template, prepare_multimodal_messages

from ._trl_compat import DataCollatorMixin, multimodal_rope_index
from .collator import DataCollatorForMultiRejectedPreference, set_pad_token
from .messages import chat_roles
from .packing import PAD_SEGMENT, pack_example
from .packing.spec import PackingSpec
from .packing.truncation import truncate
from .rows import (
    INDEX_COLUMN,
    TEXT_COLUMNS,
    check_scores,
    identical_rejected_message,
    parse_text_row,
    row_error,
)


IMAGE_COLUMNS = ("image", "images")
# Per-token outputs of a processor, laid out like `input_ids` (Gemma 3's `token_type_ids`, Qwen2.5-VL's
# `mm_token_type_ids`): the same two TRL's vision collator handles
PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")
PACKED_PREFIX = "packed_"
# Keys of a collated batch that the text collator makes; every other key is an image input of the processor
TEXT_BATCH_KEYS = frozenset(
    {
        "input_ids",
        "attention_mask",
        "completion_mask",
        "rejected_mask",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "scores",
        "unpack_index",
        INDEX_COLUMN,
    }
)
# Vision-language architectures whose packed forward is tested to give the unshared log-probs (tests/test_vision.py)
PREFIX_SHARING_VLM_TYPES = ("llava", "qwen2_5_vl")
# TRL's own message (`DataCollatorForVisionPreference`), raised here when the collator is built
PAD_TO_MULTIPLE_OF_MESSAGE = (
    "Padding to a multiple of a value is not yet implemented for vision-language modeling and prompt-completion data."
)


def is_image_row(example: dict[str, Any]) -> bool:
    """TRL's test for vision data: the row has an `image` or an `images` key."""
    return any(column in example for column in IMAGE_COLUMNS)


class ImageRow(NamedTuple):
    """One image row rendered as text: its images, the prompt text, and the response texts (the chosen first)."""

    images: list
    prompt: str
    responses: list[str]


def row_responses(example: dict[str, Any], idx: int, roles: frozenset[str] | None = None) -> tuple[Any, list, bool]:
    """Check the text columns of an image row (`rows.parse_text_row`): its prompt, its responses (the chosen first),
    and whether it holds messages. A row without `prompt` (or with None) has it extracted from the shared start of the
    responses, as for text rows."""
    if example.get("prompt") is None:
        example = {k: v for k, v in example.items() if k != "prompt"}
    row = parse_text_row(example, idx, roles=roles)
    return row.prompt, [row.chosen, *row.rejected], row.conversational


def row_images(example: dict[str, Any], idx: int) -> list:
    """The images of a row, as a list (TRL's `image` column holds one image, `images` a list)."""
    if "image" in example:
        if example["image"] is None:
            raise ValueError(f"Row {idx}, column 'image': missing value (None).")
        return [example["image"]]
    images = example["images"]
    if not isinstance(images, list):
        raise row_error(idx, "images", "a list of images", images)
    return images


def render_image_row(example: dict[str, Any], processor: ProcessorMixin, idx: int) -> ImageRow:
    """Render one image row as TRL's vision collator does, for each of its K + 1 responses.

    Conversational rows get the images placed in the prompt's first user message and the chat template applied to
    prompt + each response (`trl.data_utils.apply_chat_template`); the prompt is the longest text that every
    prompt + response starts with, so that all the responses share it. With one rejected this is TRL's rendering.
    """
    images = row_images(example, idx)
    prompt, responses, conversational = row_responses(example, idx, chat_roles(processor))
    if not conversational:  # as TRL: the text as given, its image tokens written by the user
        return ImageRow(images, prompt, responses)
    prompt = prepare_multimodal_messages(prompt, images=images)
    extra = {"chat_template_kwargs": example["chat_template_kwargs"]} if example.get("chat_template_kwargs") else {}
    rendered = [
        apply_chat_template(
            {"prompt": prompt, "completion": prepare_multimodal_messages(response), **extra}, processor
        )
        for response in responses
    ]
    prompt_text = min((r["prompt"] for r in rendered), key=len)  # each is a prefix of the prompt's own rendering
    texts = [(r["prompt"] + r["completion"])[len(prompt_text) :] for r in rendered]
    return ImageRow(images, prompt_text, texts)


def check_image_rows(dataset: Dataset, dataset_name: str) -> tuple[list[int], int, list[int]]:
    """Check the text columns of every image row of a `Dataset` before training (its images are not decoded).

    Returns each row's number of rejected, how many rejected are identical to their row's chosen, and those rows.
    """
    columns = [c for c in ("prompt", *TEXT_COLUMNS, "scores") if c in dataset.column_names]
    num_rejected, identical, identical_rows = [], 0, []
    for idx, example in enumerate(dataset.select_columns(columns)):
        try:
            _, responses, _ = row_responses(example, idx)
            check_scores(example, len(responses) - 1, idx)
        except ValueError as error:
            raise ValueError(f"{error} (in the {dataset_name} dataset)") from None
        num_rejected.append(len(responses) - 1)
        same = sum(response == responses[0] for response in responses[1:])
        identical += same
        identical_rows += [idx] if same else []
    return num_rejected, identical, identical_rows


def check_image_datasets(datasets: dict[str, Any], args, loss_spec) -> None:
    """What `prepare_preference_dataset` checks of text rows, for the image rows TRL leaves unprepared: every row's
    text columns, and the number of rejected against the loss (an `IterableDataset` is checked as it is collated)."""
    for name, dataset in datasets.items():
        if not isinstance(dataset, Dataset):
            continue
        num_rejected, identical, identical_rows = check_image_rows(dataset, name)
        loss_spec.check_num_rejected(num_rejected, name, args.precompute_ref_log_probs)
        if identical:
            warnings.warn(identical_rejected_message(identical, identical_rows, name), stacklevel=3)


def prepare_image_datasets(
    train_dataset, eval_dataset, args, loss_spec, packing: PackingSpec, models: dict, compute_metrics
):
    """The trainer's checks of image rows after TRL's `__init__` (which leaves them unprepared): every dataset's rows,
    and prefix sharing's support for the models; returns the training set with each row's index, which the
    gradient-weight record and the collator's errors (an image checked only when a batch renders it) name rows by."""
    eval_datasets = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
    check_image_datasets({"train": train_dataset, **eval_datasets}, args, loss_spec)
    if packing.prefix_sharing:
        check_image_prefix_sharing({k: m for k, m in models.items() if m is not None}, compute_metrics)
    return with_index_column(train_dataset)


def with_index_column(dataset):
    """The dataset with each row's position in `INDEX_COLUMN`, which the gradient-weight record names rows by."""
    if not isinstance(dataset, Dataset) or INDEX_COLUMN in dataset.column_names:
        return dataset
    return dataset.add_column(INDEX_COLUMN, range(len(dataset)))


def _unpadded(values: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return values[mask.bool()].tolist()


@dataclass
class DataCollatorForMultiRejectedVisionPreference(DataCollatorMixin):
    """
    Collate image rows of one chosen and K_i rejected into one batch of B + Σ K_i sequences, processing the images.

    Each example holds `images` (or `image`), `prompt` (optional, as for text rows), `chosen` and `rejected` (one
    response or a list), and optionally `scores` and `dataset_index`. The output holds the keys of
    [`DataCollatorForMultiRejectedPreference`] (`input_ids`, `attention_mask`, `completion_mask` [B + Σ K_i, L],
    `rejected_mask` [B, K_max], ...), the processor's image inputs (`pixel_values`, `image_grid_thw`, ...) and its
    per-token outputs (`token_type_ids`, `mm_token_type_ids`) laid out like `input_ids`:

    - unshared: the image inputs of every sequence (chosen ones first, then the rejected, example by example), so
      each image is repeated K_i + 1 times. With K_i = 1 this is the batch of TRL's `DataCollatorForVisionPreference`
      (the same tokens, masks and image inputs);
    - `prefix_sharing=True`: the image inputs once per example, the packed rows of `trl_dpo_ext.packing`, and
      the per-token outputs packed as `packed_token_type_ids` / `packed_mm_token_type_ids` [B, L_p].

    Args:
        processor ([`~transformers.ProcessorMixin`]): processes the images and tokenizes the text.
        max_length (`int`, *optional*): each sequence is truncated to this length.
        truncation_mode (`str`, *optional*, defaults to `"keep_start"`): which end `max_length` keeps, as for text
            rows (`trl.DPOTrainer` refuses `"keep_end"` with image rows: it could cut image tokens).
        pad_to_multiple_of (`int`, *optional*): not supported for image rows, as in TRL (raises).
        prefix_sharing (`bool`, *optional*, defaults to `False`): pack each example into one row.
    """

    processor: ProcessorMixin
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"
    prefix_sharing: bool = False
    truncation_mode: str = "keep_start"

    def __post_init__(self):
        if self.pad_to_multiple_of is not None:
            raise NotImplementedError(PAD_TO_MULTIPLE_OF_MESSAGE)

    @classmethod
    def from_config(
        cls, args, processor: ProcessorMixin, packing: PackingSpec
    ) -> DataCollatorForMultiRejectedVisionPreference:
        """The collator a `DPOConfig` and its `PackingSpec` ask for (TRL's vision collator takes the same fields but
        `prefix_sharing`)."""
        set_pad_token(args, processor)
        return cls(
            processor=processor,
            max_length=packing.max_length,
            pad_to_multiple_of=args.pad_to_multiple_of,
            prefix_sharing=packing.prefix_sharing,
            truncation_mode=packing.truncation_mode,
        )

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [render_image_row(ex, self.processor, ex.get(INDEX_COLUMN, i)) for i, ex in enumerate(examples)]
        # The example whose prompt (and images) each processed prompt is: one per sequence, or one per example
        owners = list(range(len(rows)))
        if not self.prefix_sharing:
            owners += [i for i, row in enumerate(rows) for _ in row.responses[1:]]
        images = [rows[i].images for i in owners]
        prompts = self.processor(
            images=None if all(not im for im in images) else images,  # as TRL: processors want an image, or None
            text=[rows[i].prompt for i in owners],
            padding=True,
            padding_side="left",
            return_tensors="pt",
            add_special_tokens=False,  # the chat template wrote them
        )
        completions = self.processor(
            text=[text for row in rows for text in row.responses],
            padding=True,
            padding_side="right",
            return_tensors="pt",
            add_special_tokens=False,
        )

        # Token lists of each example (example i's first processed prompt is row i in both layouts)
        token_examples, per_token, start = [], {key: [] for key in PER_TOKEN_KEYS if key in prompts}, 0
        for i, (row, example) in enumerate(zip(rows, examples, strict=True)):
            prompt_mask = prompts["attention_mask"][i]
            span = range(start, start + len(row.responses))
            start += len(row.responses)
            responses = [_unpadded(completions["input_ids"][j], completions["attention_mask"][j]) for j in span]
            token_example = {"prompt_ids": _unpadded(prompts["input_ids"][i], prompt_mask)}
            token_example.update(chosen_ids=responses[0], rejected_ids=responses[1:])
            token_example.update({k: example[k] for k in ("scores", INDEX_COLUMN) if k in example})
            token_examples.append(token_example)
            for key, values in per_token.items():
                completion_values = [
                    _unpadded(completions[key][j], completions["attention_mask"][j])
                    if key in completions
                    else [0] * len(ids)
                    for j, ids in zip(span, responses, strict=True)
                ]
                values.append((_unpadded(prompts[key][i], prompt_mask), completion_values))

        layout = DataCollatorForMultiRejectedPreference(
            pad_token_id=self.processor.tokenizer.pad_token_id,
            max_length=self.max_length,
            truncation_mode=self.truncation_mode,
            prefix_sharing=self.prefix_sharing,
        )
        output = layout(token_examples)
        output.update({k: v for k, v in prompts.items() if k not in ("input_ids", "attention_mask", *PER_TOKEN_KEYS)})
        for key, values in per_token.items():
            # Cut as the tokens were (`layout` above): each prompt + response, by the same function
            truncated = [
                [truncate(prompt, response, self.max_length, self.truncation_mode) for response in responses]
                for prompt, responses in values
            ]
            if self.prefix_sharing:
                packed = [pack_example(pairs[0][0], [r for _, r in pairs])[0] for pairs in truncated]
                output[PACKED_PREFIX + key] = _right_padded(packed, output["packed_input_ids"].size(1))
            else:  # the unshared order: every chosen, then every rejected, example by example
                pairs = [pairs[0] for pairs in truncated] + [pair for pairs in truncated for pair in pairs[1:]]
                sequences = [prompt + response for prompt, response in pairs]
                output[key] = _right_padded(sequences, output["input_ids"].size(1))
        return output


def _right_padded(rows: list[list[int]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


# ------------------------------------------------------------------------------------------- model inputs


def image_model_inputs(inputs: dict[str, Any], model, packed: bool = False) -> dict[str, Any]:
    """The processor's inputs of a collated image batch that the model's forward takes besides `input_ids` and
    `attention_mask` (`pixel_values`, `image_grid_thw`, `token_type_ids`, ...): as in TRL, every key the text layout
    does not make. For the `packed` forward, the packed per-token outputs, and the packed rows' 3D RoPE positions of
    a model that numbers tokens in 3D. `model` is unwrapped from accelerate."""
    kwargs = {k: v for k, v in inputs.items() if k not in TEXT_BATCH_KEYS and not k.startswith(PACKED_PREFIX)}
    if packed:
        kwargs.update({key: inputs[PACKED_PREFIX + key] for key in PER_TOKEN_KEYS if PACKED_PREFIX + key in inputs})
        get_rope_index = multimodal_rope_index(model)
        if get_rope_index is not None:
            kwargs["position_ids"] = packed_multimodal_position_ids(get_rope_index, inputs)
    return kwargs


def packed_multimodal_position_ids(get_rope_index, inputs: dict[str, Any]) -> torch.Tensor:
    """3D RoPE positions [3, B, L_p] of the packed rows, equal to each token's positions in its unshared sequence.

    The model's own `get_rope_index` numbers a packed row as one sequence: right for the shared prefix (which holds
    every image), and, after the last image token, each text token at its index plus a per-row offset. Each segment
    restarts at the last prompt token (`packed_position_ids`, 1D), so shifting the segment tokens by
    `packed_position_ids - index` (0 in the prefix) gives the positions they have in their unshared sequence.
    """
    input_ids = inputs["packed_input_ids"]
    valid = inputs["packed_segment_ids"] != PAD_SEGMENT
    kwargs = {"image_grid_thw": inputs.get("image_grid_thw"), "attention_mask": valid.long()}
    if PACKED_PREFIX + "mm_token_type_ids" in inputs:
        kwargs["mm_token_type_ids"] = inputs[PACKED_PREFIX + "mm_token_type_ids"]
    positions, _ = get_rope_index(input_ids, **kwargs)  # [3, B, L_p]
    index = torch.arange(input_ids.size(1), device=input_ids.device)
    shift = inputs["packed_position_ids"] - index  # [B, L_p], 0 in the prefix
    return (positions + shift).masked_fill(~valid, 0)


def check_image_prefix_sharing(models: dict[str, Any], compute_metrics) -> None:
    """Raise unless the packed forward of each model is tested to give its unshared log-probs on image rows, and if
    `compute_metrics` would need the logits of the unshared sequences."""
    for name, model in models.items():
        model_type = getattr(model.config, "model_type", None)
        if model_type not in PREFIX_SHARING_VLM_TYPES:
            raise ValueError(
                f"Prefix sharing with image rows is supported for the vision-language architectures "
                f"{list(PREFIX_SHARING_VLM_TYPES)}, where the packed forward is tested against the unshared one; the "
                f"{name} is {model_type!r}, whose image tokens may attend or be numbered differently (Gemma 3's "
                "images attend bidirectionally, for one). Set `prefix_sharing=False` for this model."
            )
    if compute_metrics is not None:
        raise NotImplementedError(
            "`compute_metrics` needs the logits of the unshared sequences, which `prefix_sharing=True` does not "
            "build for image rows (each example's images are processed once). Set `prefix_sharing=False`, or "
            "leave `compute_metrics=None` (the DPO metrics are logged either way)."
        )
