"""Offline building blocks: a character-level tokenizer and tiny causal LMs built from a config.

Nothing here downloads anything. The quickstart, the tests and the benchmarks use these so that they run on a
machine with no network and no model hub.
"""

from __future__ import annotations

import random
import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast


SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<|im_start|>", "<|im_end|>")
# ChatML, as Qwen2.5 renders it; the generation prompt opens the assistant turn
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per printable ASCII character, plus the special tokens above.

    Every string tokenizes to its characters, so a tokenized prompt is always a prefix of the tokenized
    prompt + completion. `<|im_start|>` and `<|im_end|>` are single tokens for the ChatML `chat_template`.
    """
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *string.printable])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_causal_lm(
    vocab_size: int,
    arch: str = "llama",
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    **config_kwargs,
) -> PreTrainedModel:
    """A randomly initialised Llama or Qwen2 causal LM; the same `seed` gives the same weights, in a fresh model."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=False,
        **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.to(dtype)


def flipped_preference_rows(
    num_rows: int, flip_fraction: float = 0.1, max_rejected: int = 3, seed: int = 0
) -> tuple[list[dict[str, object]], list[int]]:
    """Preference rows with a known signal, a share of them mislabeled: the rows and the indices of the flipped ones.

    Every chosen is a random lowercase word and its 1 to `max_rejected` rejected are random digit strings, except in
    `round(flip_fraction · num_rows)` rows drawn at random, where the labels are flipped (digits chosen, words
    rejected). A model learns "words over digits" from the majority within a few epochs, after which the flipped
    rows are the ones it keeps ranking wrongly (see `docs/diagnostics.md`).
    """
    rng = random.Random(seed)

    def word(alphabet: str) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 6)))

    flipped = sorted(rng.sample(range(num_rows), round(flip_fraction * num_rows)))
    flipped_set = set(flipped)
    rows = []
    for i in range(num_rows):
        good, bad = string.ascii_lowercase, string.digits
        if i in flipped_set:
            good, bad = bad, good
        num_rejected = rng.randint(1, max_rejected)
        rows.append(
            {
                "prompt": word(string.ascii_lowercase) + "?",
                "chosen": word(good),
                "rejected": [word(bad) for _ in range(num_rejected)],
            }
        )
    return rows, flipped


def cpu_training_args(output_dir: str, **overrides) -> dict:
    """Keyword arguments of a `DPOConfig` (or `SFTConfig`) for a small offline run of a tiny model on a CPU.

    No bf16, no activation checkpointing (recomputing a tiny model's activations only costs time), no reporting, no
    checkpoints, no progress bars, no dataloader workers, seed 0; `overrides` replace any of them. The one helper
    the tests, benchmarks, examples and the quickstart build their configs with.
    """
    kwargs = dict(
        output_dir=output_dir,
        report_to="none",
        bf16=False,
        activation_checkpointing=False,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return kwargs
