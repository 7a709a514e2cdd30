"""A TRL DPO script with one import changed: `trl` -> `trl_dpo_ext`. Nothing else changes.

```bash
pip install -e . && python examples/swap_one_import.py    # downloads Qwen2.5-0.5B-Instruct and the dataset
# several GPUs, no code change:
accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/swap_one_import.py
```

This is the DPO example of TRL's documentation. Its pairwise data trains exactly as with `trl.DPOTrainer` (the loss,
the gradients and the logged metrics are equal; `tests/test_trainer_matches_trl.py`). The same script takes rows
whose `rejected` is a list of K responses, as the commented lines show: they are forwarded once per chosen (K + 1
sequences per prompt, not the 2K of K expanded pairs), and `rejected_reduction` says how the K pair losses combine.
"""

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_dpo_ext import DPOConfig, DPOTrainer  # was: from trl import DPOConfig, DPOTrainer


model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
train_dataset = load_dataset("trl-lib/ultrafeedback_binarized", split="train")

# K rejected per prompt instead: group pairwise rows that share their prompt and chosen, or build the rows from rated
# responses (see examples/qwen_ultrafeedback_k3_lora.py):
#   from trl_dpo_ext.convert import group_pairwise
#   train_dataset = group_pairwise(train_dataset)

training_args = DPOConfig(output_dir="Qwen2.5-0.5B-DPO", logging_steps=10)
trainer = DPOTrainer(model=model, args=training_args, train_dataset=train_dataset, processing_class=tokenizer)
trainer.train()
