"""The quickstart, step by step: SFT-on-chosen reference initialisation, then DPO on one chosen + K rejected.

```bash
pip install -e . && python examples/quickstart.py      # the same run as `trl-dpo-ext quickstart`, about 1-2 CPU minutes
```

Offline: the task (sort the digits of the prompt, `trl_dpo_ext.quickstart.task`), its best-of-4 preference rows rated by a
ground-truth reward, a character tokenizer and a tiny Llama are all built here. `trl_dpo_ext.quickstart.run` does the
same with a progress bar per stage and prints the before/after table.
"""

import torch
from datasets import Dataset

from trl_dpo_ext import DPOConfig, DPOTrainer
from trl_dpo_ext.quickstart import (
    SortDigitsTask,
    char_tokenizer,
    completion_logps,
    greedy_reward,
    implicit_reward_accuracy,
    tiny_causal_lm,
)


torch.set_num_threads(1)  # a model this small runs fastest on one thread

task = SortDigitsTask()
train_prompts = task.prompts(3000, seed=0)
eval_prompts = task.prompts(200, seed=1, exclude=train_prompts)
# {"prompt": "60473=", "chosen": "03467", "rejected": ["03647", "60473"]}: the best of 4 answers, and the worse ones
train_rows = task.preference_rows(train_prompts, seed=0)
eval_rows = task.preference_rows(eval_prompts, seed=1)

tokenizer = char_tokenizer(chat_template=None)
model = tiny_causal_lm(len(tokenizer), seed=0, hidden_size=64, num_hidden_layers=2)

args = DPOConfig(
    output_dir="outputs/quickstart-dpo",  # under outputs/, which .gitignore covers
    per_device_train_batch_size=32,
    num_train_epochs=2,
    learning_rate=5e-4,
    beta=0.1,
    rejected_reduction="mean",  # the K pair losses of a prompt are averaged
    lr_scheduler_type="cosine",
    warmup_steps=10,
    max_length=None,
    precompute_ref_log_probs=True,  # the reference (the SFT model) is run once over the data, then dropped
    # Stage 1, run when the trainer is built: fine-tune on the (prompt, chosen) pairs, saved in outputs/quickstart-dpo/sft_ref
    ref_init="sft_on_chosen",
    ref_init_learning_rate=3e-3,
    ref_init_num_train_epochs=6,
    ref_init_batch_size=32,
    activation_checkpointing=False,
    bf16=False,
    use_cpu=not torch.cuda.is_available(),
    save_strategy="no",
    logging_steps=20,
    report_to="none",
    seed=0,
)
dataset = Dataset.from_list([{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in train_rows])
trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)

pairs = [(row["prompt"], c) for row in eval_rows for c in [row["chosen"], *row["rejected"]]]
sft_logps = completion_logps(trainer.model, tokenizer, pairs)  # the SFT model is also DPO's reference
sft_reward, _ = greedy_reward(trainer.model, tokenizer, task, eval_prompts)

trainer.train()  # stage 2: DPO

accuracy = implicit_reward_accuracy(completion_logps(trainer.model, tokenizer, pairs), sft_logps, eval_rows)
dpo_reward, _ = greedy_reward(trainer.model, tokenizer, task, eval_prompts)
print(f"held-out preference accuracy of the implicit reward: 0.500 after SFT, {accuracy:.3f} after DPO")
print(f"mean ground-truth reward of greedy answers:          {sft_reward:.3f} after SFT, {dpo_reward:.3f} after DPO")
