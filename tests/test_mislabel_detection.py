"""Issue 5's evidence: rows whose gradient weight stays high late in training are the mislabeled ones.

120 rows teach "a lowercase word beats digits"; 12 of them (10%) have their labels flipped. After 4 epochs of a tiny
model with the record on, the rows ranked by mean σ(r̂_l − r̂_w) over the last half of training are compared with the
flipped ones. Chance would put 10% of the flipped rows in the top 10%; the issue asks for at least 60%.
"""

import csv

from datasets import Dataset

from trl_dpo_ext import DPOConfig, DPOTrainer
from trl_dpo_ext.grad_weight_record import read_record, record_path
from trl_dpo_ext.quickstart import char_tokenizer, flipped_preference_rows, tiny_causal_lm
from trl_dpo_ext.report import write_report


NUM_ROWS, NUM_EPOCHS = 120, 4


def test_top_decile_of_late_gradient_weight_holds_the_flipped_rows(tmp_path):
    rows, flipped = flipped_preference_rows(NUM_ROWS, flip_fraction=0.1, max_rejected=3, seed=0)
    tokenizer = char_tokenizer()
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_train_epochs=NUM_EPOCHS,
        learning_rate=1e-3,
        precompute_ref_log_probs=True,  # the reference is the initial model: one pass before training, no copy kept
        grad_weight_record=True,
        report_to="none",
        logging_steps=10,
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=tiny_causal_lm(len(tokenizer), seed=0),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()

    record = read_record(record_path(tmp_path))
    assert len(record) == NUM_ROWS * NUM_EPOCHS  # every row once per epoch

    report = write_report(record_path(tmp_path), tmp_path / "report", dataset=rows, top_fraction=0.1)
    top = report["top_indices"]
    assert len(top) == len(flipped) == 12
    caught = set(top) & set(flipped)
    assert len(caught) >= 0.6 * len(flipped), f"top 10% holds {len(caught)} of {len(flipped)} flipped rows"

    # The table carries each ranked row's text: the top rows are the ones whose chosen is made of digits
    with open(report["table"], encoding="utf-8") as file:
        table = list(csv.DictReader(file))
    assert [int(row["index"]) for row in table[: len(top)]] == top
    for row in table[: len(top)]:
        assert row["top"] == "True"
        if int(row["index"]) in caught:
            assert row["chosen"].removesuffix(tokenizer.eos_token).isdigit(), row
