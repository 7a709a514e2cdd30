"""An offline preference task with a ground-truth reward: sort the digits of the prompt.

The quickstart, the tests, the benchmarks and the experiments share it. A prompt is a few distinct digits and `=`,
e.g. ``"8315="``; the right answer is the digits in increasing order, ``"1358"``. `reward` scores any completion
against that answer, so the quality of a model's generations can be measured exactly, with no judge.

Preference rows are built like real ones (UltraFeedback, Best-of-n): a noisy "annotator" policy writes
`num_candidates` answers per prompt, `reward` rates them, the best becomes the chosen and those rated strictly lower
the rejected. The annotator makes *systematic* mistakes, as real models do: most often it stops one digit early.
Best-of-n still keeps many of those as the chosen (when no complete answer was drawn), so the most frequent chosen
answer of a prompt is often the truncated one. Supervised fine-tuning on the chosen imitates that mode; DPO also sees
each complete answer beaten against the truncated one and learns to finish, which is what the quickstart measures.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class SortDigitsTask:
    """The sort-the-digits task and its annotator.

    Args:
        min_digits, max_digits: a prompt has between these many distinct digits.
        p_correct: probability that the annotator writes the sorted digits.
        p_stop_early: probability that it writes the sorted digits but the last (largest) one.
        p_swap: probability that it swaps two neighbouring digits of the sorted answer.
        The rest of the time it copies the prompt's digits unsorted.
    """

    min_digits: int = 4
    max_digits: int = 6
    p_correct: float = 0.1
    p_stop_early: float = 0.5
    p_swap: float = 0.2

    def __post_init__(self) -> None:
        if not 2 <= self.min_digits <= self.max_digits <= 10:
            raise ValueError(
                f"Need 2 <= min_digits <= max_digits <= 10, got min_digits={self.min_digits}, "
                f"max_digits={self.max_digits}."
            )
        total = self.p_correct + self.p_stop_early + self.p_swap
        if min(self.p_correct, self.p_stop_early, self.p_swap) < 0 or total > 1:
            raise ValueError(
                f"The annotator's probabilities must be >= 0 and sum to at most 1, got p_correct={self.p_correct}, "
                f"p_stop_early={self.p_stop_early}, p_swap={self.p_swap} (sum {total})."
            )

    # ---------------------------------------------------------------- prompts and reward

    def sample_prompt(self, rng: random.Random) -> str:
        num_digits = rng.randint(self.min_digits, self.max_digits)
        return "".join(rng.sample("0123456789", num_digits)) + "="

    def prompts(self, num: int, seed: int, exclude: Iterable[str] = ()) -> list[str]:
        """`num` distinct prompts, none of them in `exclude` (e.g. the training prompts, for a held-out set)."""
        rng, seen, out = random.Random(seed), set(exclude), []
        while len(out) < num:
            prompt = self.sample_prompt(rng)
            if prompt not in seen:
                seen.add(prompt)
                out.append(prompt)
        return out

    @staticmethod
    def answer(prompt: str) -> str:
        return "".join(sorted(prompt.rstrip("=")))

    @classmethod
    def reward(cls, prompt: str, completion: str) -> float:
        """Ground truth in [0, 1]: the share of positions that hold the right digit, over the longer of the two
        strings, so that a missing, extra or misplaced digit each costs the same. 1.0 only for the exact answer."""
        target = cls.answer(prompt)
        completion = completion.strip()
        hits = sum(a == b for a, b in zip(completion, target))
        return hits / max(len(completion), len(target))

    # ------------------------------------------------------------------------- annotator

    def annotate(self, prompt: str, rng: random.Random) -> str:
        """One answer of the noisy annotator."""
        target = self.answer(prompt)
        u = rng.random()
        if u < self.p_correct:
            return target
        u -= self.p_correct
        if u < self.p_stop_early:
            return target[:-1]
        u -= self.p_stop_early
        if u < self.p_swap:
            i = rng.randrange(len(target) - 1)
            return target[:i] + target[i + 1] + target[i] + target[i + 2 :]
        return prompt.rstrip("=")

    def preference_rows(
        self, prompts: Iterable[str], seed: int, num_candidates: int = 4, keep_scores: bool = False
    ) -> list[dict]:
        """Best-of-`num_candidates` rows: `{"prompt", "chosen", "rejected": [...]}` (and `"scores"`, chosen first).

        Identical candidates are merged; the rejected are the distinct candidates rated strictly below the chosen, so
        a row has between 1 and `num_candidates - 1` of them. A prompt whose candidates are all rated the same gives
        no row.
        """
        rng, rows = random.Random(seed), []
        for prompt in prompts:
            candidates = list(dict.fromkeys(self.annotate(prompt, rng) for _ in range(num_candidates)))
            rated = sorted(((self.reward(prompt, c), c) for c in candidates), key=lambda sc: -sc[0])
            best_score, chosen = rated[0]
            rejected = [(s, c) for s, c in rated[1:] if s < best_score]
            if not rejected:
                continue
            row = {"prompt": prompt, "chosen": chosen, "rejected": [c for _, c in rejected]}
            if keep_scores:
                row["scores"] = [best_score] + [s for s, _ in rejected]
            rows.append(row)
        return rows
