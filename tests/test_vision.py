"""Image rows: the K-rejected trainer on tiny vision-language models built from a config (LLaVA, Qwen2.5-VL, Gemma 3)
against stock `trl.DPOTrainer`, plain forwards, and the unshared forward."""

import math

import pytest
import torch
import trl
from conftest import (
    assert_every_trainable_parameter_changed,
    assert_grads_close,
    loss_and_grads,
    make_args,
    trainable_parameters,
)
from datasets import Dataset
from toy_vision import VLM_FAMILIES, tiny_vlm, tiny_vlm_processor, toy_image, vision_tower
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from trl_dpo_ext import DPOTrainer
from trl_dpo_ext.grad_weight_record import read_record, record_path
from trl_dpo_ext.losses import REJECTED_REDUCTIONS, PreferenceLogps, multi_rejected_loss
from trl_dpo_ext.quickstart import char_tokenizer, cpu_training_args, tiny_causal_lm
from trl_dpo_ext.vision import PREFIX_SHARING_VLM_TYPES, DataCollatorForMultiRejectedVisionPreference


QUESTIONS = ["What is it?", "Colour?", "Describe."]
CHOSEN = ["A cat.", "Red", "Noise!"]
REJECTED = [["A dog.", "No", "Two"], ["Blue", "It is", "?"], ["Quiet", "A cat.", "Sky"]]


def message(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def image_rows(num_rejected=(1, 2, 3), pairwise: bool = False, scores: bool = False) -> list[dict]:
    """Conversational rows, each with its own image; `pairwise` gives TRL's format (one rejected, not a list)."""
    rows = []
    for i, (question, chosen, rejected, k) in enumerate(zip(QUESTIONS, CHOSEN, REJECTED, num_rejected, strict=True)):
        rejected = [message("assistant", r) for r in rejected[:k]]
        row = {"images": [toy_image(i)], "prompt": message("user", question), "chosen": message("assistant", chosen)}
        row["rejected"] = rejected[0] if pairwise else rejected
        if scores:
            row["scores"] = [1.0] + [-0.5 * j for j in range(k)]
        rows.append(row)
    return rows


def expand_to_pairs(row: dict) -> list[dict]:
    return [{**row, "rejected": rejected} for rejected in row["rejected"]]


def vlm_policy_and_ref(family: str, noise: float = 0.05, **text_config):
    """A fresh processor, reference and policy: the same seeded weights, the policy then moved by seeded noise."""
    processor = tiny_vlm_processor(family)
    ref, policy = tiny_vlm(processor, family, **text_config), tiny_vlm(processor, family, **text_config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise)
    return policy, ref, processor


def ext_trainer(family, rows, tmp_path, model_config=None, compute_metrics=None, **config):
    policy, ref, processor = vlm_policy_and_ref(family, **(model_config or {}))
    config.setdefault("per_device_train_batch_size", len(rows))
    return DPOTrainer(
        model=policy,
        ref_model=ref,
        args=make_args(tmp_path / "ext", **config),
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        compute_metrics=compute_metrics,
    )


def stock_trainer(family, rows, tmp_path, **config):
    policy, ref, processor = vlm_policy_and_ref(family)
    args = trl.DPOConfig(**cpu_training_args(str(tmp_path / "stock"), per_device_train_batch_size=len(rows), **config))
    return trl.DPOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor
    )


def collate(trainer):
    dataset = trainer.train_dataset
    return trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_single_rejected_image_rows_match_stock_trl(family, tmp_path):
    rows = image_rows(num_rejected=(1, 1, 1), pairwise=True)
    stock, ours = stock_trainer(family, rows, tmp_path), ext_trainer(family, rows, tmp_path)

    # The same batch: tokens, masks and the processor's image inputs (the padding token ids aside)
    expected, batch = collate(stock), collate(ours)
    assert set(expected) <= set(batch)
    for key, value in expected.items():
        mine = batch[key] * batch["attention_mask"] if key == "input_ids" else batch[key]
        value = value * expected["attention_mask"] if key == "input_ids" else value
        assert torch.equal(mine, value), key

    expected_loss, expected_grads = loss_and_grads(stock)
    loss, grads = loss_and_grads(ours)
    assert expected_loss.item() != pytest.approx(math.log(2), abs=1e-4), "the policy must differ from the reference"
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
    assert_grads_close(grads, expected_grads)
    for key, values in stock._metrics["train"].items():
        assert ours._metrics["train"][key][-1] == pytest.approx(values[-1], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_ragged_k_image_rows_mean_is_the_average_of_per_row_stock_trl_losses(family, tmp_path):
    """Each rejected is scored against its own row's prompt and image: the loss is the mean over rows of TRL's loss on
    the row's pairs, each pair carrying the row's image."""
    rows = image_rows(num_rejected=(1, 2, 3))
    loss, grads = loss_and_grads(ext_trainer(family, rows, tmp_path))
    expected_loss, expected_grads = 0.0, {}
    for i, row in enumerate(rows):
        row_loss, row_grads = loss_and_grads(stock_trainer(family, expand_to_pairs(row), tmp_path / str(i)))
        expected_loss += row_loss / len(rows)
        for name, grad in row_grads.items():
            expected_grads[name] = expected_grads.get(name, 0.0) + grad / len(rows)
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
    assert_grads_close(grads, expected_grads)

    # The image matters: the last row scored against the first row's image has another loss
    swapped = {**rows[2], "images": rows[0]["images"]}
    swapped_loss, _ = loss_and_grads(stock_trainer(family, expand_to_pairs(swapped), tmp_path / "swapped"))
    assert abs(swapped_loss.item() - row_loss.item()) > 1e-5


def plain_forward_logps(model, processor, row: dict, response: list[dict]) -> tuple[torch.Tensor, int]:
    """log π(response | prompt, image) by a plain forward of the whole chat and a log-softmax, and its token count."""
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["prompt"][0]["content"]}]}]
    prompt_text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = processor.apply_chat_template(prompt + response, tokenize=False)
    num_prompt = processor(images=row["images"], text=[prompt_text], return_tensors="pt")["input_ids"].size(1)
    inputs = processor(images=row["images"], text=[full_text], return_tensors="pt")
    input_ids = inputs["input_ids"][0]
    logits = model(**inputs).logits[0, :-1]
    log_probs = logits.log_softmax(-1).gather(1, input_ids[1:, None]).squeeze(1)
    return log_probs[num_prompt - 1 :].sum(), input_ids.size(0) - num_prompt


@pytest.mark.parametrize("reduction", REJECTED_REDUCTIONS)
def test_every_reduction_on_image_rows_is_the_loss_of_plain_forward_log_probs(reduction, tmp_path):
    family = "qwen2_5_vl"
    rows = image_rows(num_rejected=(1, 2, 3), scores=True)
    loss, _ = loss_and_grads(ext_trainer(family, rows, tmp_path, rejected_reduction=reduction))

    policy, ref, processor = vlm_policy_and_ref(family)
    max_k = max(len(row["rejected"]) for row in rows)
    values = {name: torch.zeros(len(rows), max_k) for name in ("policy", "ref", "lengths")}
    chosen = {name: torch.zeros(len(rows), 1) for name in ("policy", "ref", "lengths")}
    with torch.no_grad():
        for i, row in enumerate(rows):
            for name, model in (("policy", policy), ("ref", ref)):
                chosen[name][i, 0], chosen["lengths"][i, 0] = plain_forward_logps(model, processor, row, row["chosen"])
                for k, response in enumerate(row["rejected"]):
                    values[name][i, k], values["lengths"][i, k] = plain_forward_logps(model, processor, row, response)
    mask = torch.arange(max_k)[None] < torch.tensor([len(row["rejected"]) for row in rows])[:, None]
    scores = torch.zeros(len(rows), 1 + max_k)
    for i, row in enumerate(rows):
        scores[i, : len(row["scores"])] = torch.tensor(row["scores"])
    logps = PreferenceLogps(
        chosen["policy"], values["policy"], chosen["ref"], values["ref"], mask, chosen["lengths"], values["lengths"]
    )
    expected = multi_rejected_loss("sigmoid", reduction, logps, beta=0.1, scores=scores).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def images_encoded(counts: list[int]):
    """A forward hook on a vision encoder recording how many images each call encodes."""

    def hook(module, args, kwargs, output):
        if "grid_thw" in kwargs:  # Qwen2.5-VL: the patches of all images in one tensor, one grid row per image
            counts.append(kwargs["grid_thw"].size(0))
        else:
            counts.append((args[0] if args else kwargs["pixel_values"]).size(0))

    return hook


@pytest.mark.parametrize("family", PREFIX_SHARING_VLM_TYPES)
def test_prefix_sharing_on_image_rows_equals_the_unshared_forward_and_encodes_each_image_once(family, tmp_path):
    rows = image_rows(num_rejected=(1, 2, 3))
    results = {}
    for shared in (False, True):
        trainer = ext_trainer(family, rows, tmp_path / str(shared), prefix_sharing=shared)
        counts = []
        vision_tower(trainer.model).register_forward_hook(images_encoded(counts), with_kwargs=True)
        batch = collate(trainer)
        with torch.no_grad():
            per_token, _ = trainer._per_token_logps(trainer.model, batch, reference=False)
        results[shared] = {"per_token": per_token, "counts": counts, "loss_and_grads": loss_and_grads(trainer)}
        results[shared]["metrics"] = {key: values[-1] for key, values in trainer._metrics["train"].items()}

    num_sequences = sum(1 + len(row["rejected"]) for row in rows)
    assert results[False]["counts"][0] == num_sequences  # each image once per sequence, as TRL
    assert results[True]["counts"][0] == len(rows)  # each image once per example
    torch.testing.assert_close(results[True]["per_token"], results[False]["per_token"], atol=1e-5, rtol=1e-5)
    (loss, grads), (expected_loss, expected_grads) = results[True]["loss_and_grads"], results[False]["loss_and_grads"]
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-5)
    assert_grads_close(grads, expected_grads, atol=1e-5)
    for key, value in results[False]["metrics"].items():
        assert results[True]["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_prefix_sharing_reads_the_text_models_attention_not_the_top_level_one(tmp_path):
    """A VLM whose language model runs eager attention beside an SDPA vision tower: the packed rows must get the
    additive mask eager attention adds to its scores (a bool mask added to the scores masks nothing)."""
    rows = image_rows(num_rejected=(1, 2, 3))
    per_token = {}
    for shared in (False, True):
        policy, ref, processor = vlm_policy_and_ref("llava")
        for model in (policy, ref):
            model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
        assert policy.config._attn_implementation != policy.config.text_config._attn_implementation
        trainer = DPOTrainer(
            model=policy, ref_model=ref, args=make_args(tmp_path / str(shared), prefix_sharing=shared,
            per_device_train_batch_size=len(rows)), train_dataset=Dataset.from_list(rows), processing_class=processor,
        )  # fmt: skip
        with torch.no_grad():
            per_token[shared], _ = trainer._per_token_logps(trainer.model, collate(trainer), reference=False)
    torch.testing.assert_close(per_token[True], per_token[False], atol=1e-5, rtol=1e-5)


def test_training_on_image_rows_with_prefix_sharing_updates_every_parameter_and_records_each_row(tmp_path):
    rows = image_rows(num_rejected=(1, 2, 3))
    trainer = ext_trainer(
        "qwen2_5_vl", rows, tmp_path, prefix_sharing=True, rejected_reduction="softmax", grad_weight_record=True
    )
    before = trainable_parameters(trainer.model)
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert_every_trainable_parameter_changed(trainer.model, before)
    lines = read_record(record_path(tmp_path / "ext"))
    assert sorted((line["step"], line["index"]) for line in lines) == [(s, i) for s in (1, 2) for i in range(3)]
    assert {line["index"]: len(line["grad_weight"]) for line in lines} == {0: 1, 1: 2, 2: 3}


def text_model_trainer(trainer_class, config_class, rows, tmp_path, **config):
    tokenizer = char_tokenizer()
    args = config_class(**cpu_training_args(str(tmp_path), **config))
    return trainer_class(
        model=tiny_causal_lm(len(tokenizer)),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def test_text_model_with_image_rows_raises_trls_error(tmp_path):
    with pytest.raises(ValueError, match="vision-related.*vision-language model") as stock:
        text_model_trainer(trl.DPOTrainer, trl.DPOConfig, image_rows(pairwise=True), tmp_path)
    for rows in (image_rows(pairwise=True), image_rows(num_rejected=(3, 3, 3))):
        with pytest.raises(ValueError) as ours:
            text_model_trainer(DPOTrainer, trl.DPOConfig, rows, tmp_path)
        assert str(ours.value) == str(stock.value)


@pytest.mark.filterwarnings("ignore:The `'keep_end'` truncation mode is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "config",
    [{"precompute_ref_log_probs": True}, {"truncation_mode": "keep_end", "max_length": 32}],
    ids=["precompute_ref_log_probs", "keep_end"],
)
def test_trls_guards_on_image_rows_raise_trls_errors(config, tmp_path):
    with pytest.raises(ValueError) as stock:
        stock_trainer("llava", image_rows(pairwise=True), tmp_path, **config)
    with pytest.raises(ValueError) as ours:
        ext_trainer("llava", image_rows(num_rejected=(1, 2, 3)), tmp_path, **config)
    assert str(ours.value) == str(stock.value)


def test_pad_to_multiple_of_with_image_rows_fails_at_construction_with_trls_error(tmp_path):
    _, _, processor = vlm_policy_and_ref("llava")
    with pytest.raises(NotImplementedError) as stock:  # TRL raises it on the first batch
        DataCollatorForVisionPreference(processor, pad_to_multiple_of=8)(image_rows(pairwise=True))
    with pytest.raises(NotImplementedError) as ours:
        ext_trainer("llava", image_rows(), tmp_path, pad_to_multiple_of=8)
    assert str(ours.value) == str(stock.value)


def test_prefix_sharing_with_image_rows_fails_at_construction_where_unsupported(tmp_path):
    # Gemma 3's image tokens attend to each other both ways, which the packed mask would lose (its sliding layers
    # are refused before: here every layer attends globally)
    with pytest.raises(ValueError, match="'gemma3'.*Set `prefix_sharing=False`"):
        ext_trainer(
            "gemma3", image_rows(), tmp_path, model_config={"layer_types": ["full_attention"] * 2}, prefix_sharing=True
        )
    with pytest.raises(NotImplementedError, match="`compute_metrics`.*Set `prefix_sharing=False`"):
        ext_trainer("llava", image_rows(), tmp_path, prefix_sharing=True, compute_metrics=lambda prediction: {})


def test_bad_image_row_is_named_before_training(tmp_path):
    rows = image_rows()
    rows[1]["rejected"] = []
    with pytest.raises(ValueError, match=r"Row 1, column 'rejected'.*\(in the train dataset\)"):
        ext_trainer("llava", rows, tmp_path)


def test_an_image_found_bad_when_its_batch_is_rendered_is_named_by_its_dataset_row(tmp_path):
    """Images are not decoded before training; a bad one fails when its batch is collated, naming the row of the
    dataset as given, not the row's position in the batch."""
    rows = image_rows(num_rejected=(1, 2, 1))
    rows[2]["images"] = None
    trainer = ext_trainer("llava", rows, tmp_path, per_device_train_batch_size=1)
    with pytest.raises(ValueError, match=r"Row 2, column 'images'"):
        trainer.data_collator([trainer.train_dataset[2]])


@pytest.mark.filterwarnings("ignore:`return_outputs=True`:FutureWarning")
def test_compute_metrics_on_image_rows_gets_the_logits_of_each_sequence_with_its_image(tmp_path):
    rows = image_rows(num_rejected=(1, 2, 3))
    seen = {}

    def compute_metrics(prediction):
        seen["logits"] = torch.as_tensor(prediction.predictions)
        return {}

    trainer = ext_trainer("llava", rows, tmp_path, compute_metrics=compute_metrics, per_device_eval_batch_size=3)
    trainer.evaluate(Dataset.from_list(rows))
    assert seen["logits"].size(0) == sum(1 + len(row["rejected"]) for row in rows)
    # The last sequence is the third rejected of row 2: its logits are those of a plain forward with row 2's image
    processor, row = trainer.processing_class, rows[2]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["prompt"][0]["content"]}]}]
    text = processor.apply_chat_template(prompt + row["rejected"][2], tokenize=False)
    with torch.no_grad():
        expected = trainer.model(**processor(images=row["images"], text=[text], return_tensors="pt")).logits[0]
    torch.testing.assert_close(seen["logits"][-1, : expected.size(0)], expected, atol=1e-5, rtol=1e-5)


def test_padding_free_on_image_rows_raises_naming_prefix_sharing(tmp_path):
    with pytest.raises(NotImplementedError, match=r"`padding_free=True` is not supported for image rows yet"):
        ext_trainer("qwen2_5_vl", image_rows(), tmp_path, padding_free=True)


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_image_rows_per_token_inputs_are_truncated_with_their_tokens(truncation_mode):
    processor = tiny_vlm_processor("gemma3")  # its processor gives `token_type_ids`, 1 on the image tokens
    full = DataCollatorForMultiRejectedVisionPreference(processor)(image_rows())
    lengths = full["attention_mask"].sum(1).tolist()
    max_length = min(lengths) - 2  # cuts every sequence
    collator = DataCollatorForMultiRejectedVisionPreference(
        processor, max_length=max_length, truncation_mode=truncation_mode
    )
    cut = collator(image_rows())
    for i, length in enumerate(lengths):
        kept = slice(0, max_length) if truncation_mode == "keep_start" else slice(length - max_length, length)
        for key in ("input_ids", "token_type_ids", "completion_mask"):
            assert cut[key][i, :max_length].tolist() == full[key][i, kept].tolist(), (i, key)
