"""What the Hub model card says was trained: the method's name and paper for each `rejected_reduction`.

TRL's `create_model_card` reads `trainer._name` and `trainer._paper` (`title`, `id`, `citation`) and adds
`trainer._tag_names` to the tags; `DPOTrainer` gives `_name` and `_paper` from `card_method`.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass


DPO_PAPER = {
    "title": "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
    "id": "2305.18290",
    "citation": textwrap.dedent("""\
        @inproceedings{rafailov2023direct,
            title        = {{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}},
            author       = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and Stefano Ermon and Chelsea Finn},
            year         = 2023,
            booktitle    = {Advances in Neural Information Processing Systems 36 (NeurIPS 2023)},
            url          = {https://arxiv.org/abs/2305.18290},
        }"""),
}

S_DPO_PAPER = {
    "title": "On Softmax Direct Preference Optimization for Recommendation",
    "id": "2406.09215",
    "citation": textwrap.dedent("""\
        @inproceedings{chen2024softmax,
            title        = {{On Softmax Direct Preference Optimization for Recommendation}},
            author       = {Yuxin Chen and Junfei Tan and An Zhang and Zhengyi Yang and Leheng Sheng and Enzhi Zhang and Xiang Wang and Tat-Seng Chua},
            year         = 2024,
            booktitle    = {Advances in Neural Information Processing Systems 37 (NeurIPS 2024)},
            url          = {https://arxiv.org/abs/2406.09215},
        }"""),
}

NCA_PAPER = {
    "title": "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    "id": "2402.05369",
    "citation": textwrap.dedent("""\
        @inproceedings{chen2024noise,
            title        = {{Noise Contrastive Alignment of Language Models with Explicit Rewards}},
            author       = {Huayu Chen and Guande He and Lifan Yuan and Ganqu Cui and Hang Su and Jun Zhu},
            year         = 2024,
            booktitle    = {Advances in Neural Information Processing Systems 37 (NeurIPS 2024)},
            url          = {https://arxiv.org/abs/2402.05369},
        }"""),
}


@dataclass(frozen=True)
class CardMethod:
    name: str  # "This model was trained with {name}, a method introduced in [{paper title}](...)"
    paper: dict[str, str]


# rejected_reduction -> what the card names. The pairwise reductions combine K copies of the DPO loss.
CARD_METHODS = {
    "mean": CardMethod("DPO with K rejected responses per prompt (mean over the K pair losses)", DPO_PAPER),
    "sum": CardMethod("DPO with K rejected responses per prompt (sum over the K pair losses)", DPO_PAPER),
    "min": CardMethod("DPO with K rejected responses per prompt (the hardest rejected only)", DPO_PAPER),
    "softmax": CardMethod("S-DPO (softmax DPO, one chosen against K rejected)", S_DPO_PAPER),
    "plackett_luce": CardMethod(
        "Plackett-Luce DPO (the ranking likelihood of appendix A.3 of the DPO paper)", DPO_PAPER
    ),
    "infonca": CardMethod("InfoNCA (DPO over K+1 responses fitted to their scores)", NCA_PAPER),
    "nca": CardMethod("NCA (noise contrastive alignment over K+1 responses)", NCA_PAPER),
}


def card_method(rejected_reduction: str, loss_types: list[str] | None = None) -> CardMethod:
    """The name and paper of `rejected_reduction`; pairwise loss types other than the DPO sigmoid are named too."""
    if rejected_reduction not in CARD_METHODS:
        raise KeyError(
            f"No model-card entry for rejected_reduction={rejected_reduction!r}; known: {list(CARD_METHODS)}."
        )
    method = CARD_METHODS[rejected_reduction]
    if loss_types and list(loss_types) != ["sigmoid"]:
        return CardMethod(f"{method.name}, loss_type={'+'.join(loss_types)}", method.paper)
    return method


class ModelCardMixin:
    """What TRL's `create_model_card` names, for a trainer with `rejected_reduction`: it writes "trained with {_name},
    a method introduced in {_paper}" and tags the card with `_tag_names`."""

    _tag_names = ["trl", "dpo", "trl-dpo-ext"]

    @property
    def _name(self) -> str:
        return card_method(self.rejected_reduction, self.args.loss_type).name

    @property
    def _paper(self) -> dict[str, str]:
        return card_method(self.rejected_reduction).paper
