"""Does a model rank held-out rated responses as the judge does?

The log-probability of each response of a prompt, tokenized as the trainer tokenizes it, and the agreement of any
score built from it (the implicit reward summed or per token, a log-likelihood, a trivial ranker such as the token
count) with a judge's ratings of the same responses. Judge ratings closer than `tie` are a tie and the pair is
dropped; a ranker's own tie counts half. Used by `examples/smollm2_alpacaeval.py` and the real-model experiment.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .data import tokenize_row


def normalised(text: str) -> str:
    """Lower case and single spaces: the key held-out prompts are deduplicated on."""
    return " ".join(text.lower().split())


def cut_to_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """`text` cut to its first `max_tokens` tokens (unchanged when it is no longer)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def response_token_ids(tokenizer, prompt, responses: list[str], index: int = 0) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids and each response's ids, as the trainer tokenizes the row: a prompt given as chat messages
    goes through the chat template (each response an assistant turn), and the prompt/response boundary is TRL's."""
    conversational = not isinstance(prompt, str)
    turns = [[{"role": "assistant", "content": r}] for r in responses] if conversational else list(responses)
    row = {"prompt": prompt, "chosen": turns[0], "rejected": turns[1:]}
    ids = tokenize_row(row, index, tokenizer, tokenizer.eos_token, conversational=conversational)
    return ids["prompt_ids"], [ids["chosen_ids"], *ids["rejected_ids"]]


def padded_batch(
    prompt_ids: list[int], response_ids: list[list[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask): the prompt followed by each response, one row each, right-padded."""
    width = len(prompt_ids) + max(map(len, response_ids))
    input_ids = torch.full((len(response_ids), width), pad_token_id)
    mask = torch.zeros_like(input_ids)
    for j, response in enumerate(response_ids):
        input_ids[j, : len(prompt_ids) + len(response)] = torch.tensor(prompt_ids + response)
        mask[j, : len(prompt_ids) + len(response)] = 1
    return input_ids, mask


def summed_logps(logits: torch.Tensor, input_ids: torch.Tensor, prompt_length: int, lengths: list[int]) -> list[float]:
    """log π(response | prompt) of each row of a `padded_batch` from its logits: the response tokens' log-probs summed."""
    per_token = logits[:, :-1].float().log_softmax(-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    return [per_token[j, prompt_length - 1 : prompt_length - 1 + n].sum().item() for j, n in enumerate(lengths)]


@torch.no_grad()
def response_logps(model, tokenizer, prompt, responses: list[str], index: int = 0) -> tuple[list[float], list[int]]:
    """(log π(response | prompt) of each response, its token count): one padded forward of the prompt's responses."""
    prompt_ids, ids = response_token_ids(tokenizer, prompt, responses, index)
    input_ids, mask = padded_batch(prompt_ids, ids, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.cpu()
    lengths = list(map(len, ids))
    return summed_logps(logits, input_ids, len(prompt_ids), lengths), lengths


class JudgeCounts(NamedTuple):
    """One prompt's scores against the judge's: pairs put in the judge's order, pairs put in the other, pairs the judge
    separates (its ratings `tie` or more apart; the rest are dropped), and whether both put the same response first."""

    concordant: int
    discordant: int
    pairs: int
    top1: bool


def judge_counts(values: list[float], judge: list[float], tie: float) -> JudgeCounts:
    concordant = discordant = pairs = 0
    for a in range(len(judge)):
        for b in range(a + 1, len(judge)):
            if abs(judge[a] - judge[b]) < tie:
                continue
            pairs += 1
            sign = (values[a] - values[b]) * (judge[a] - judge[b])
            concordant += sign > 0
            discordant += sign < 0
    top1 = max(range(len(values)), key=values.__getitem__) == max(range(len(judge)), key=judge.__getitem__)
    return JudgeCounts(concordant, discordant, pairs, top1)


def judge_agreement(values: list[list[float]], judge: list[list[float]], tie: float) -> tuple[float, float]:
    """(pairwise accuracy pooled over the judge-separated pairs of all prompts, a ranker's tie counting half;
    Kendall's τ per prompt over its separated pairs, averaged over the prompts that have any)."""
    counts = [judge_counts(v, s, tie) for v, s in zip(values, judge, strict=True)]
    pairs = sum(c.pairs for c in counts)
    correct = sum(c.concordant + 0.5 * (c.pairs - c.concordant - c.discordant) for c in counts)
    taus = [(c.concordant - c.discordant) / c.pairs for c in counts if c.pairs]
    return correct / pairs, sum(taus) / len(taus)
