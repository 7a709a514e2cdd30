"""`DPOConfig`: `trl.DPOConfig` plus the fields of the one-chosen, K-rejected trainer."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field, fields

import torch
import trl
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

from .guards import ON_NONFINITE, check_on_nonfinite
from .loss_spec import LossSpec
from .losses import REJECTED_REDUCTIONS
from .packing.spec import PackingSpec
from .selection import REJECTED_SELECTIONS, check_selection


logger = logging.getLogger(__name__)


def check_distributed_launch(args) -> None:
    """Fail before any work when a launcher started several processes (`WORLD_SIZE` > 1) but the Trainer runs this
    one alone: each would then train on its own, and all of them would write to the same `output_dir`."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:
        raise RuntimeError(
            f"This process is one of WORLD_SIZE={launched} started by a launcher (torchrun, accelerate launch), but "
            f"the Trainer runs it alone (distributed type {args.distributed_state.distributed_type}), as it found no "
            "GPU backend: every process would train on its own and they would race on the same `output_dir`. To "
            "train on the CPU across processes, add `--use_cpu true` (`DPOConfig(use_cpu=True)`, gloo backend); with "
            "GPUs, give each process one (`--ddp_backend nccl`); or launch a single process."
        )


@dataclass
class DPOConfig(trl.DPOConfig):
    r"""
    Configuration class for [`trl_dpo_ext.DPOTrainer`]: every field of [`trl.DPOConfig`], plus those below.

    Each rejected response of an example is paired with its chosen response; every pairwise `loss_type` is applied to
    each (chosen, rejected_k) pair, and the K pair losses are combined by `rejected_reduction`.

    Parameters:
        > Parameters that control the one-chosen, K-rejected loss

        rejected_reduction (`str`, *optional*, defaults to `"mean"`):
            How the K rejected responses of an example enter the loss. Possible values are:

            - `"mean"`: the mean over k of the pair losses, the broadcast loss
              `mean_k −log σ(β·Δ_w − β·Δ_lk)` for `loss_type="sigmoid"`. Every prompt weighs the same.
            - `"sum"`: the sum over k; a prompt weighs in proportion to its number of rejected.
            - `"min"`: only the hardest negative, the pair whose rejected has the highest implicit reward.
            - `"softmax"`: the one-vs-K contrastive loss `−log e^{βΔw} / (e^{βΔw} + Σ_k e^{βΔlk})` (S-DPO, the top-1
              Plackett-Luce term).
            - `"plackett_luce"`: the likelihood of the full ranking chosen > rejected_1 > … > rejected_K (DPO paper,
              appendix A.3); the rejected are ranked by the `scores` column when there is one (a rejected scored
              above its chosen is an error), else taken in their listed order, best first (a warning says so).
            - `"infonca"`, `"nca"`: InfoNCA and NCA (arXiv 2402.05369), fitting the implicit rewards to the target
              distribution softmax(scores / `score_temperature`) of the `scores` column (one-hot on the chosen
              without scores).

            The listwise values (`"softmax"` and after) replace the sigmoid loss: they need `loss_type="sigmoid"`
            (optionally with `"sft"`). With one rejected per example, `"mean"`, `"sum"`, `"min"`, `"softmax"` and
            `"plackett_luce"` all equal the stock pairwise loss.
        score_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature α of the target distribution softmax(scores / α) of `rejected_reduction="infonca"` and
            `"nca"`. Smaller values put more of the target on the best-scored response.
        rejected_selection (`str`, *optional*, defaults to `"all"`):
            Which rejected of an example the training forward and backward see (see `docs/concepts.md`,
            "Hard-negative selection"). `"all"`: every one. `"hardest"`: a no-grad forward of the chosen and all K
            first; then the training pass on the chosen and the `num_selected` rejected with the largest effective
            gradient weight, the loss being the configured one over those. `"sampled"`: `num_selected` rejected drawn
            with probability proportional to their effective weight, each pair's loss importance-weighted so that the
            expected gradient is the full reduction's (for `rejected_reduction` `"mean"` or `"sum"` only). Rows with
            K ≤ `num_selected` train as with `"all"`. Training steps only; evaluation sees every rejected.
        num_selected (`int`, *optional*, defaults to `1`):
            The number m of rejected per example that `rejected_selection="hardest"` or `"sampled"` keeps.

        > Parameters that control the forward pass (see `docs/prefix_sharing.md`)

        prefix_sharing (`bool`, *optional*, defaults to `False`):
            Whether to forward the prompt of an example once for its chosen and all its rejected responses: each
            example is packed as one row `[prompt | chosen | rejected_1 | … | rejected_K]` with a 4D attention mask
            in which each response sees only the prompt and itself, for the policy, the reference and the precompute
            pass. The log-probs are those of the unshared forward. Needs an attention implementation that takes a
            4D mask (`"sdpa"`, `"eager"` or `"flex_attention"`) and, with `max_length`, `truncation_mode="keep_start"`.
        padding_free (`bool`, *optional*, defaults to `False`):
            TRL's field, working here (TRL 1.16's `DPOTrainer` turns it off): the sequences of a batch (with
            `prefix_sharing`, its examples) are laid end to end in one row, or in as few rows of at most
            `token_budget` tokens as fit, with no padding; positions restart at 0 for each sequence and no token
            attends across sequences. The log-probs are those of the padded forward. Needs `attn_implementation`
            `"sdpa"`, `"eager"`, `"flex_attention"`, or, without `prefix_sharing`, `"flash_attention_2"`/`"_3"`.
        token_budget (`int` or `None`, *optional*, defaults to `None`):
            With `padding_free=True`, the most tokens in one packed row (the name and meaning of TRL's
            `token_budget`: the real tokens packed into a single row); `None` lays the whole batch in one row. It
            bounds the attention's memory and work per row. A sequence longer than the budget is truncated to it
            as `max_length` truncates (`truncation_mode`), so every example of a batch is kept; with
            `prefix_sharing`, an example whose responses do not fit in one row together is split over several,
            each repeating the prompt.

        > Parameters that control the reference initialisation (see `docs/ref_init.md`)

        ref_init (`str` or `None`, *optional*, defaults to `None`):
            How the reference model is made when no `ref_model` is passed. `None` keeps TRL's behaviour (the
            reference is the initial model). `"sft_on_chosen"` first fine-tunes the model on the (prompt, chosen)
            pairs of the training set, loss on the chosen tokens only (π_ref = argmax_π E[log π(y_w|x)]), saves it to
            `ref_init_output_dir`, and uses it as both the frozen reference and the starting policy. Ignored, with a
            warning, when a `ref_model` is passed.
        ref_init_learning_rate (`float`, *optional*, defaults to `2e-5`):
            Learning rate of the SFT stage (the default of `trl.SFTConfig`).
        ref_init_num_train_epochs (`float`, *optional*, defaults to `1.0`):
            Epochs of the SFT stage over the (prompt, chosen) pairs; used when `ref_init_max_steps` is `-1`.
        ref_init_max_steps (`int`, *optional*, defaults to `-1`):
            Optimizer steps of the SFT stage; overrides `ref_init_num_train_epochs` when positive. Needed with an
            `IterableDataset`.
        ref_init_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Per-device batch size of the SFT stage. `None` uses `per_device_train_batch_size`. The SFT stage sees one
            sequence per example, against 1 + K per example for DPO, so it can often be larger.
        ref_init_output_dir (`str` or `None`, *optional*, defaults to `None`):
            Folder of the saved SFT reference. `None` uses `<output_dir>/sft_ref`. An existing folder made with the
            same base model, data and SFT settings is reused; one made with others is an error.

        > Parameters that control the gradient-weight diagnostics (see `docs/diagnostics.md`)

        grad_weight_record (`bool`, *optional*, defaults to `False`):
            Whether to record, at every training step, each row's gradient weights σ(r̂_l − r̂_w) and effective
            weights (one per rejected) in `<output_dir>/grad_weights.jsonl`, one JSON line per row and step with its
            dataset `index`, `step` and `epoch`. Written by the main process; a run resumed from a checkpoint first
            drops the lines of the steps after it, and a fresh run starts an empty file. Read it with
            `trl-dpo-ext report`. The `grad_weight/...` metrics are logged either way.

        > Parameters that control the non-finite checks (see `docs/diagnostics.md`)

        on_nonfinite (`str`, *optional*, defaults to `"stop"`):
            What a training step with a NaN or infinite loss, implicit reward, gradient or trainable parameter does:
            `"stop"` raises `NonFiniteTrainingError` naming the step and the rows, before the step is logged or
            saved; `"warn"` logs the same message and training goes on.

        > Parameters that control resuming

        resume_allow_changes (`bool`, *optional*, defaults to `False`):
            Whether a run may resume from a checkpoint saved with another loss (`rejected_reduction`, `beta`, the loss
            types and their settings) or other training data (its rows, its numbers of rejected K). Each checkpoint
            records them in `run_identity.json`; by default a difference is an error naming the field, its saved and
            its new value. `True` logs the differences and resumes.

    > [!NOTE]
    > One default differs from [`trl.DPOConfig`]: `bf16`, when not set, is `False` on a machine without bf16 support
    > (no bf16-capable GPU or TPU, and `use_cpu=False`), where TRL's `True` fails in `transformers`; one line is logged.
    > Elsewhere it is TRL's (`True` if `fp16` is not set), and an explicit `bf16=True` keeps TRL's behaviour.
    > `dataloader_pin_memory` is `False` on a machine without an accelerator (torch would warn that it is unused).
    """

    rejected_reduction: str = field(
        default="mean",
        metadata={
            "help": "How the K rejected responses of an example enter the loss: 'mean' (the broadcast loss, default), "
            "'sum', 'min' (hardest negative only), or a listwise loss replacing the sigmoid loss: 'softmax' "
            "(one-vs-K), 'plackett_luce' (full ranking), 'infonca' or 'nca' (fit to the `scores` column).",
            "choices": list(REJECTED_REDUCTIONS),
        },
    )

    score_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Temperature α of the target distribution softmax(scores / α) of the 'infonca' and 'nca' "
            "reductions."
        },
    )

    rejected_selection: str = field(
        default="all",
        metadata={
            "help": "Which rejected the training pass sees: 'all' (default), 'hardest' (the num_selected with the "
            "largest gradient weight, from a no-grad pass over all K) or 'sampled' (drawn in proportion to the "
            "weights, importance-weighted: unbiased for the 'mean' and 'sum' reductions).",
            "choices": list(REJECTED_SELECTIONS),
        },
    )

    num_selected: int = field(
        default=1,
        metadata={"help": "The number m of rejected per example kept by rejected_selection 'hardest' or 'sampled'."},
    )

    prefix_sharing: bool = field(
        default=False,
        metadata={
            "help": "Forward each prompt once for its chosen and all its rejected responses: one packed row per "
            "example with a 4D attention mask (SDPA, eager or FlexAttention); same log-probs as the unshared forward."
        },
    )

    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Lay the sequences of a batch (with `prefix_sharing`, its examples) end to end in one row, or in "
            "rows of at most `token_budget` tokens, without padding; positions restart per sequence and no token "
            "attends across sequences. Same log-probs as the padded forward."
        },
    )
    token_budget: int | None = field(
        default=None,
        metadata={
            "help": "With `padding_free=True`, the most tokens in one packed row (None: the whole batch in one row). "
            "Longer sequences are truncated to it as by `max_length`."
        },
    )

    ref_init: str | None = field(
        default=None,
        metadata={
            "help": "How the reference is made when no `ref_model` is passed: None (TRL's behaviour, the initial "
            "model) or 'sft_on_chosen' (fine-tune on (prompt, chosen) first; the result is both the reference and the "
            "starting policy).",
            "choices": ["sft_on_chosen"],
        },
    )
    ref_init_learning_rate: float = field(
        default=2e-5, metadata={"help": "Learning rate of the SFT stage of `ref_init='sft_on_chosen'`."}
    )
    ref_init_num_train_epochs: float = field(
        default=1.0,
        metadata={"help": "Epochs of the SFT stage of `ref_init`, used when `ref_init_max_steps` is -1."},
    )
    ref_init_max_steps: int = field(
        default=-1,
        metadata={"help": "Optimizer steps of the SFT stage of `ref_init`; -1 uses `ref_init_num_train_epochs`."},
    )
    ref_init_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Per-device batch size of the SFT stage of `ref_init`; None uses `per_device_train_batch_size`."
        },
    )
    ref_init_output_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the SFT reference made by `ref_init`; None uses `<output_dir>/sft_ref`."},
    )

    grad_weight_record: bool = field(
        default=False,
        metadata={
            "help": "Record each training row's gradient weights σ(r̂_l − r̂_w) (and effective weights) at every step "
            "in `<output_dir>/grad_weights.jsonl`, for `trl-dpo-ext report`."
        },
    )

    on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "A step with a NaN or infinite loss, reward, gradient or parameter: 'stop' (raise, naming the step "
            "and rows, before it is saved) or 'warn'.",
            "choices": list(ON_NONFINITE),
        },
    )
    resume_allow_changes: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint saved with another loss (reduction, beta, ...) or other training data "
            "(rows, K): logged instead of an error."
        },
    )

    def _check_ref_init(self) -> None:
        if self.ref_init not in (None, "sft_on_chosen"):
            raise ValueError(f"`ref_init` must be None or 'sft_on_chosen', got {self.ref_init!r}.")
        if self.ref_init_learning_rate <= 0:
            raise ValueError(f"`ref_init_learning_rate` must be positive, got {self.ref_init_learning_rate}.")
        if self.ref_init_max_steps == 0 or self.ref_init_max_steps < -1:
            raise ValueError(
                f"`ref_init_max_steps` must be a positive number of steps, or -1 to use `ref_init_num_train_epochs`; "
                f"got {self.ref_init_max_steps}."
            )
        if self.ref_init_max_steps == -1 and self.ref_init_num_train_epochs <= 0:
            raise ValueError(
                f"`ref_init_num_train_epochs` must be positive when `ref_init_max_steps=-1`, got "
                f"{self.ref_init_num_train_epochs}."
            )
        if self.ref_init_batch_size is not None and self.ref_init_batch_size < 1:
            raise ValueError(f"`ref_init_batch_size` must be None or at least 1, got {self.ref_init_batch_size}.")
        if self.ref_init is None:
            # As PEFT's configs: options that are set but unused warn instead of failing
            unused = [f for f in fields(self) if f.name.startswith("ref_init_")]
            set_fields = [f.name for f in unused if getattr(self, f.name) != f.default]
            if set_fields:
                warnings.warn(
                    f"{set_fields} are set but `ref_init=None`, so they are unused. Set `ref_init='sft_on_chosen'` to "
                    "make the SFT reference.",
                    stacklevel=3,
                )

    def _default_bf16(self) -> None:
        # TRL turns `bf16` on whenever it is not set, and transformers then raises on a machine without bf16 support
        # ("where supported", says TRL): there, an unset `bf16` means float32. An explicit `bf16=True` keeps the error.
        supported = self.use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available()
        if self.bf16 is None and not self.fp16 and not supported:
            self.bf16 = False
            device = "GPU" if torch.cuda.is_available() else "CPU"
            logger.warning(
                f"No bf16-capable accelerator found, so `bf16` (not set) is False: training runs in float32 on the "
                f"{device}. Set `bf16=True` and `use_cpu=True` for bf16 autocast on the CPU."
            )

    def _cpu_and_checkpointing_defaults(self) -> None:
        # TRL's default `gradient_checkpointing=True` is under the name transformers 5.25 deprecates (a FutureWarning
        # in every run): pass the default on under the new name. A `gradient_checkpointing` set by hand still warns.
        if getattr(self, "activation_checkpointing", False) is None and self.gradient_checkpointing is True:
            self.activation_checkpointing = True
        # Pinned memory needs an accelerator: on a CPU, torch warns in every run that it is not used
        if self.dataloader_pin_memory and not torch.accelerator.is_available():
            self.dataloader_pin_memory = False
            logger.info("No accelerator found, so `dataloader_pin_memory` is False (pinned memory needs one).")

    def _check_packing(self) -> None:
        PackingSpec.from_config(self)  # every packing rule raises there, at construction
        if self.token_budget is not None and not self.padding_free:
            warnings.warn(
                f"`token_budget={self.token_budget}` is set but `padding_free=False`, so it is unused. Set "
                "`padding_free=True` to pack the batch in rows of at most `token_budget` tokens.",
                stacklevel=3,
            )

    @classmethod
    def from_trl_config(cls, args: trl.DPOConfig) -> DPOConfig:
        """A plain `trl.DPOConfig` as ours, with the defaults of the new fields (as `trl.SFTTrainer` upgrades a
        `TrainingArguments`); one of ours is returned as it is."""
        if isinstance(args, cls):
            return args
        dict_args = args.to_dict()
        # to_dict hides every `*_token` field (`hub_token`, `pad_token`) behind a placeholder
        dict_args.update({name: getattr(args, name) for name in dict_args if name.endswith("_token")})
        with warnings.catch_warnings():  # the deprecations of the given values were reported when `args` was built
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return cls(**dict_args)

    def __post_init__(self):
        self._default_bf16()
        self._cpu_and_checkpointing_defaults()
        super().__post_init__()
        self._check_ref_init()
        self._check_packing()
        check_on_nonfinite(self.on_nonfinite)
        # Every rule on which loss combinations are meaningful lives in the spec, which raises here
        spec = LossSpec.from_config(self)
        check_selection(self.rejected_selection, self.num_selected, spec.reduction, spec.loss_types, spec.ld_alpha)
