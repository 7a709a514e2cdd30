"""Non-finite gradient weights: told apart from the "no k-th rejected" padding by a mask, counted in the metrics,
written as null in the record; and `report` says so per row, and says what it expected of a file that is no record."""

import json
import math

import pytest
import torch
from conftest import make_args, policy_and_ref
from datasets import Dataset

from trl_dpo_ext import DPOTrainer, report
from trl_dpo_ext.diagnostics import weight_statistics
from trl_dpo_ext.grad_weight_record import read_record, record_path


ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": ["5", "22", "four"]},
    {"prompt": "sky? ", "chosen": "blue", "rejected": ["green"]},
    {"prompt": "abc", "chosen": "def", "rejected": ["xyz", "abcd"]},
    {"prompt": "hello ", "chosen": "hi there", "rejected": ["go", "no", "bye", "ok"]},
]
NUM_PAIRS = sum(len(row["rejected"]) for row in ROWS)  # 10; the batch is [4, 4] with 6 padding slots


@pytest.fixture
def diverged_run(tokenizer, tmp_path):
    """lr=1e30, warned about rather than stopped: every weight is NaN from step 2 on (the 4 rows are one batch)."""
    policy, ref = policy_and_ref(tokenizer)
    args = make_args(tmp_path, learning_rate=1e30, max_steps=3, on_nonfinite="warn", grad_weight_record=True)
    trainer = DPOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer
    )
    trainer.train()
    return trainer, tmp_path


def test_weight_statistics_counts_a_nan_of_a_real_pair_apart_from_padding():
    nan = math.nan
    weights = torch.tensor([[0.2, nan], [nan, 0.9]])
    present = torch.tensor([[True, True], [False, True]])  # (0, 1) is a real pair whose weight is NaN; (1, 0) padding
    stats = weight_statistics(weights, "w", present)
    assert stats["w/nonfinite"] == 1
    assert stats["w/mean"] == pytest.approx((0.2 + 0.9) / 2)
    assert stats["w/rank_0"] == pytest.approx(0.2) and stats["w/rank_1"] == pytest.approx(0.9)
    # Every real pair NaN: the count stays, the other keys (over no finite pair) go
    assert weight_statistics(torch.full((2, 2), nan), "w", present) == {"w/nonfinite": 3}


def test_nan_weights_are_counted_in_the_metrics_and_written_as_null(diverged_run):
    trainer, tmp_path = diverged_run
    logs = {log["step"]: log for log in trainer.state.log_history if "loss" in log}
    assert logs[1]["grad_weight/nonfinite"] == 0 and 0 < logs[1]["grad_weight/mean"] < 1
    for step in (2, 3):
        assert logs[step]["grad_weight/nonfinite"] == NUM_PAIRS
        assert logs[step]["grad_weight_eff/nonfinite"] == NUM_PAIRS
    records = read_record(record_path(tmp_path))
    by_step = {(r["step"], r["index"]): r for r in records}
    for index, row in enumerate(ROWS):
        k = len(row["rejected"])
        assert (
            all(isinstance(w, float) for w in by_step[1, index]["grad_weight"])
            and len(by_step[1, index]["grad_weight"]) == k
        )
        assert by_step[2, index]["grad_weight"] == [None] * k  # one null per real pair, none for the padding
    # The record stays strict JSON (no NaN token)
    assert "NaN" not in record_path(tmp_path).read_text()


def test_report_names_each_row_with_nonfinite_weights_and_its_steps(diverged_run):
    _, tmp_path = diverged_run
    with pytest.raises(ValueError, match=r"non-finite gradient weights .* for 4 rows") as error:
        report.write_report(tmp_path, tmp_path / "report")
    for index in range(4):
        assert f"row {index} at steps 2-3" in str(error.value)


def test_report_command_prints_one_line_and_the_traceback_only_with_debug(diverged_run, capsys):
    _, tmp_path = diverged_run
    with pytest.raises(SystemExit) as exit_:
        report.main([str(tmp_path)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("trl-dpo-ext report: error: ") and "row 0 at steps 2-3" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(ValueError, match="non-finite gradient weights"):
        report.main([str(tmp_path), "--debug"])


@pytest.mark.parametrize(
    "name, content, found",
    [
        (
            "grad_weights.png",
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" + bytes(range(256)),
            "got binary data",
        ),
        ("ranking.csv", b"rank,index,top,mean_grad_weight\n1,0,True,0.9\n", "line 1: not a JSON object"),
        ("other.jsonl", b'{"prompt": "2+2=", "chosen": "4"}\n', "line 1 has no ['index', 'step', 'grad_weight']"),
    ],
    ids=["png", "csv", "other_json"],
)
def test_report_on_a_file_that_is_no_record_says_what_it_expected(tmp_path, capsys, name, content, found):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        report.write_report(path, tmp_path / "report")
    message = str(error.value)
    assert message.startswith(f"{path} is not a gradient-weight record: expected the JSON lines")
    assert found in message
    with pytest.raises(SystemExit):
        report.main([str(path)])
    assert "Traceback" not in capsys.readouterr().err


def test_a_finite_record_still_reports(tmp_path):
    """The checks leave a good record alone (two rows, steps 1-2)."""
    lines = [
        {"index": i, "step": s, "epoch": 0, "grad_weight": [w], "grad_weight_eff": [w]}
        for s in (1, 2)
        for i, w in ((0, 0.9), (1, 0.1))
    ]
    (tmp_path / "grad_weights.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = report.write_report(tmp_path, tmp_path / "report")
    assert result["top_indices"] == [0]
