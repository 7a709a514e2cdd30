"""Real-data recipe: Qwen2.5-0.5B-Instruct, UltraFeedback with one chosen and the 3 lowest-rated rejected, LoRA.

```bash
# 8 GPUs (DDP); the SFT-on-chosen reference is made first, on the same processes, then DPO runs
accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/qwen_ultrafeedback_k3_lora.py \
    --output_dir Qwen2.5-0.5B-UF-K3-LoRA --per_device_train_batch_size 4 --gradient_accumulation_steps 2
# one GPU: python examples/qwen_ultrafeedback_k3_lora.py --output_dir Qwen2.5-0.5B-UF-K3-LoRA
# any flag of `trl-dpo-ext dpo` (every DPOConfig and ModelConfig field) overrides the recipe's defaults below
```

Data: `openbmb/UltraFeedback`, whose rows hold 4 responses of different models, each with a `fine-grained_score`
(the mean of its 4 GPT-4 ratings). `trl_dpo_ext.convert.rated_to_multi_rejected` keeps the best-rated response as
the chosen and the 3 lowest-rated as the rejected, drops responses within `--min_score_gap` of the chosen and rows
without 3 rejected left, and keeps the scores in a `scores` column (used by `rejected_reduction="plackett_luce"`,
`"infonca"` and `"nca"`). Rows are conversational, so the model's chat template is applied.

Model: LoRA (r=32) on all linear layers. With `ref_init="sft_on_chosen"`, the SFT stage trains an adapter on the
chosen responses and merges it into the base weights (saved in `<output_dir>/sft_ref`); DPO then trains a new adapter
on that model, and the reference is the same model with the adapter disabled: no second copy in memory.

Not run in the tests (it needs the Hub and a GPU); what the tests check of the same path is `tests/test_cli.py`
(the `dpo` command on real text) and `tests/test_multiprocess.py` (2 processes = 1 process).
"""

from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config

from trl_dpo_ext import DPOConfig, DPOTrainer
from trl_dpo_ext.convert import rated_to_multi_rejected


@dataclass
class RecipeArguments:
    dataset_name: str = field(default="openbmb/UltraFeedback", metadata={"help": "Rated multi-response dataset."})
    num_rejected: int = field(default=3, metadata={"help": "Rejected kept per prompt (K), the lowest-rated."})
    min_score_gap: float = field(default=0.5, metadata={"help": "Rejected score <= chosen score minus this gap."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Keep only the first rows (a quick try)."})
    test_size: int = field(default=500, metadata={"help": "Rows held out for evaluation."})


def main() -> None:
    parser = TrlParser((RecipeArguments, DPOConfig, ModelConfig))
    parser.set_defaults(
        model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct",
        dtype="bfloat16",
        use_peft=True,
        lora_r=32,
        lora_alpha=64,
        lora_target_modules="all-linear",
        learning_rate=5e-6,
        num_train_epochs=1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        beta=0.1,
        rejected_reduction="mean",
        max_length=1024,
        ref_init="sft_on_chosen",
        ref_init_learning_rate=1e-4,  # LoRA learning rates are higher than full fine-tuning's
        ref_init_num_train_epochs=1,
        eval_strategy="steps",
        eval_steps=200,
        logging_steps=10,
        save_steps=500,
        bf16=True,
    )
    recipe, args, model_args = parser.parse_args_and_config()
    args.model_init_kwargs = {"dtype": model_args.dtype, **(args.model_init_kwargs or {})}

    from datasets import load_dataset

    raw = load_dataset(recipe.dataset_name, split="train")
    if recipe.max_train_rows:
        raw = raw.select(range(min(recipe.max_train_rows, len(raw))))
    with args.main_process_first(desc="converting the rated rows"):
        dataset = rated_to_multi_rejected(
            raw,
            num_rejected=recipe.num_rejected,
            min_rejected=recipe.num_rejected,
            min_score_gap=recipe.min_score_gap,
            prompt_column="instruction",
            completions_column="completions",
            response_key="response",
            score_key="fine-grained_score",
            conversational=True,
        )
    split = dataset.train_test_split(test_size=recipe.test_size, seed=args.seed)

    trainer = DPOTrainer(
        model=model_args.model_name_or_path,
        args=args,
        train_dataset=split["train"],
        eval_dataset=split["test"] if args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
