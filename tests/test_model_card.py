"""The Hub model card names what was trained: the `rejected_reduction`'s method and paper, and a `trl-dpo-ext` tag."""

import pytest
import yaml
from conftest import make_args, policy_and_ref
from datasets import Dataset

from trl_dpo_ext import DPOTrainer
from trl_dpo_ext.losses import REJECTED_REDUCTIONS
from trl_dpo_ext.model_card import CARD_METHODS


ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": ["5", "22"], "scores": [1.0, 0.2, 0.0]},
    {"prompt": "1+2=", "chosen": "3", "rejected": ["4"], "scores": [1.0, 0.5]},
]
# rejected_reduction -> (words the method's name must contain, arXiv id of its paper): written out here
EXPECTED = {
    "mean": ("DPO", "mean", "2305.18290"),
    "sum": ("DPO", "sum", "2305.18290"),
    "min": ("DPO", "hardest", "2305.18290"),
    "softmax": ("S-DPO", "softmax", "2406.09215"),  # Chen et al. 2024, On Softmax Direct Preference Optimization
    "plackett_luce": ("Plackett-Luce", "appendix A.3", "2305.18290"),  # the DPO paper's Plackett-Luce model
    "infonca": ("InfoNCA", "scores", "2402.05369"),  # Chen et al. 2024, Noise Contrastive Alignment
    "nca": ("NCA", "noise contrastive", "2402.05369"),
}


def test_every_reduction_has_a_card_entry():
    assert set(CARD_METHODS) == set(REJECTED_REDUCTIONS) == set(EXPECTED)


@pytest.mark.parametrize("reduction", sorted(EXPECTED))
def test_model_card_names_the_reduction_and_its_paper(tokenizer, tmp_path, reduction):
    policy, ref = policy_and_ref(tokenizer)
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=make_args(tmp_path, rejected_reduction=reduction),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
    )
    trainer.create_model_card(model_name="tiny-k-rejected")
    card = (tmp_path / "README.md").read_text()
    first_words, second_words, paper_id = EXPECTED[reduction]
    (sentence,) = [line for line in card.splitlines() if line.startswith("This model was trained with ")]
    assert first_words in sentence and second_words in sentence, sentence
    assert f"(https://huggingface.co/papers/{paper_id})" in sentence
    assert f"url          = {{https://arxiv.org/abs/{paper_id}}}" in card  # the citation of that paper
    metadata = yaml.safe_load(card.split("---")[1])
    assert {"trl", "dpo", "trl-dpo-ext"} <= set(metadata["tags"])
    assert "trl-dpo-ext" in trainer.model.model_tags  # the tag TRL adds to the pushed model's config too


def test_model_card_names_a_pairwise_loss_other_than_dpos(tokenizer, tmp_path):
    policy, ref = policy_and_ref(tokenizer)
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=make_args(tmp_path, loss_type=["ipo"], rejected_reduction="mean"),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
    )
    trainer.create_model_card()
    assert (
        "(mean over the K pair losses), loss_type=ipo, a method introduced in" in (tmp_path / "README.md").read_text()
    )
