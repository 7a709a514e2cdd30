"""`LossSpec`: built once from the config, every combination rule raised at construction, the loss the trainer uses."""

import pytest
import torch
import torch.nn.functional as F
import trl

from trl_dpo_ext import DPOConfig
from trl_dpo_ext.loss_spec import LossSpec
from trl_dpo_ext.losses import PreferenceLogps


def logps() -> PreferenceLogps:
    return PreferenceLogps(
        chosen=torch.tensor([[-1.0], [-2.0]]),
        rejected=torch.tensor([[-3.0, -1.5], [-0.5, 0.0]]),
        ref_chosen=torch.tensor([[-1.5], [-1.0]]),
        ref_rejected=torch.tensor([[-2.0, -2.0], [-1.0, 0.0]]),
        rejected_mask=torch.tensor([[True, True], [True, False]]),
        chosen_lengths=torch.tensor([[2.0], [3.0]]),
        rejected_lengths=torch.tensor([[1.0, 2.0], [4.0, 1.0]]),
    )


def test_spec_reads_every_loss_field_of_the_config(tmp_path):
    args = DPOConfig(
        str(tmp_path), bf16=False, report_to="none", loss_type=["sigmoid", "sft"], loss_weights=[0.7, 0.3], beta=0.2,
        rejected_reduction="sum", label_smoothing=0.1, discopop_tau=0.2, ld_alpha=0.5, use_weighting=True,
    )  # fmt: skip
    spec = LossSpec.from_config(args)
    assert spec == LossSpec(
        loss_types=("sigmoid", "sft"), loss_weights=(0.7, 0.3), reduction="sum", beta=0.2, label_smoothing=0.1,
        discopop_tau=0.2, ld_alpha=0.5, use_weighting=True,
    )  # fmt: skip
    assert spec.sft_weight == pytest.approx(0.3)


def test_a_plain_trl_config_gets_the_defaults_of_the_new_fields(tmp_path):
    args = DPOConfig.from_trl_config(trl.DPOConfig(str(tmp_path), bf16=False, report_to="none"))
    spec = LossSpec.from_config(args)
    assert (spec.reduction, spec.score_temperature, spec.loss_types) == ("mean", 1.0, ("sigmoid",))


def test_preference_loss_is_the_weighted_sum_of_the_seeds_broadcast_loss_and_ignores_sft():
    spec = LossSpec(loss_types=("sigmoid", "sft"), loss_weights=(0.8, 0.2), beta=0.5)
    lp = logps()
    delta_w = lp.chosen - lp.ref_chosen
    delta_l = lp.rejected - lp.ref_rejected
    pair = -F.logsigmoid(0.5 * (delta_w - delta_l))
    per_example = torch.stack([pair[0].mean(), pair[1, 0]])  # example 1 has one rejected
    torch.testing.assert_close(spec.preference_loss(lp), 0.8 * per_example.mean())


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"reduction": "max"}, r"`rejected_reduction` must be one of .* got 'max'"),
        ({"loss_types": ("dpo",)}, r"Unknown `loss_type` \['dpo'\]"),
        ({"loss_types": ("sigmoid", "sft")}, r"got 1 weights for 2 loss types"),
        ({"reduction": "softmax", "loss_types": ("ipo",)}, "listwise form of the sigmoid loss"),
        ({"reduction": "nca", "f_divergence_type": "js_divergence"}, "has no form for"),
        ({"reduction": "infonca", "score_temperature": 0.0}, "`score_temperature` must be positive, got 0.0"),
        ({"reduction": "plackett_luce", "use_weighting": True}, "use_weighting=True"),
        ({"loss_types": ("aot",), "reduction": "min"}, "sorts one margin per example"),
    ],
)
def test_every_meaningless_combination_raises_when_the_spec_is_built(fields, match):
    with pytest.raises(ValueError, match=match):
        LossSpec(**fields)


def test_the_config_raises_the_specs_errors_at_construction(tmp_path):
    with pytest.raises(ValueError, match="listwise form of the sigmoid loss"):
        DPOConfig(str(tmp_path), bf16=False, report_to="none", rejected_reduction="softmax", loss_type=["hinge"])


def test_data_dependent_rules_name_the_row():
    with pytest.raises(ValueError, match=r"row 2 of the train dataset has 3 in column 'rejected'"):
        LossSpec(loss_types=("aot",)).check_num_rejected([1, 1, 3], "train", precompute_ref_log_probs=False)
    with pytest.raises(NotImplementedError, match="`ld_alpha` with `precompute_ref_log_probs=True`"):
        LossSpec(ld_alpha=0.5).check_num_rejected([2], "train", precompute_ref_log_probs=True)
    LossSpec(loss_types=("aot",)).check_num_rejected([1, 1], "train", precompute_ref_log_probs=True)
