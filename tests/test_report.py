"""The gradient-weight report: ranking, table, figure and command line, on a record written by hand."""

import csv
import json
import sys
import warnings

import pytest

from trl_dpo_ext.report import main, rank_rows, write_report


DATASET = [
    {"prompt": "p0", "chosen": "a", "rejected": ["b"]},
    {"prompt": "p1", "chosen": "c", "rejected": ["d", "e"]},
    {"prompt": "p2", "chosen": [{"role": "assistant", "content": "f"}], "rejected": "g"},
]


def write_record(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def line(index, step, weights):
    return {"index": index, "step": step, "epoch": 0, "grad_weight": weights, "grad_weight_eff": weights}


# Steps 1–4; the last half is steps 3 and 4. Row 0 is high early then learned; row 1 stays high (mean of its two
# rejected); row 2 stays middling.
LINES = [
    line(0, 1, [0.9]),
    line(1, 1, [0.6, 0.8]),
    line(2, 2, [0.5]),
    line(0, 3, [0.1]),
    line(1, 3, [0.7, 0.9]),
    line(2, 4, [0.4]),
    line(0, 4, [0.05]),
]


def test_rows_are_ranked_by_their_mean_weight_over_the_last_half():
    ranking, window_start = rank_rows(LINES, last_fraction=0.5)
    assert window_start == 3
    assert [(r["index"], r["observations"]) for r in ranking] == [(1, 1), (2, 1), (0, 2)]
    assert [r["mean_grad_weight"] for r in ranking] == pytest.approx([0.8, 0.4, 0.075])
    assert ranking[2]["mean_grad_weight_all_steps"] == pytest.approx((0.9 + 0.1 + 0.05) / 3)
    assert (ranking[2]["last_step"], ranking[2]["last_grad_weight"]) == (4, 0.05)
    # The whole run as the window: row 0's early 0.9 now counts
    ranking, window_start = rank_rows(LINES, last_fraction=1.0)
    assert window_start == 1
    assert [r["index"] for r in ranking] == [1, 2, 0]


def test_report_writes_the_figure_and_the_table_with_the_rows_text(tmp_path):
    record = write_record(tmp_path / "grad_weights.jsonl", LINES)
    result = write_report(record, tmp_path / "out", dataset=DATASET, top_fraction=0.34)
    assert result["top_indices"] == [1]
    assert result["steps"] == [1, 4] and result["num_records"] == 7 and result["num_rows"] == 3
    with open(result["figure"], "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(result["table"], encoding="utf-8") as file:
        table = list(csv.DictReader(file))
    assert [(row["rank"], row["index"], row["top"]) for row in table] == [
        ("1", "1", "True"),
        ("2", "2", "False"),
        ("3", "0", "False"),
    ]
    assert (table[0]["prompt"], table[0]["chosen"], table[0]["rejected"]) == ("p1", "c", '["d", "e"]')
    assert json.loads(table[1]["chosen"]) == [{"role": "assistant", "content": "f"}]


def test_report_names_a_record_index_outside_the_dataset(tmp_path):
    record = write_record(tmp_path / "grad_weights.jsonl", LINES)
    with pytest.raises(ValueError, match="Record row index 2 is outside the dataset \\(2 rows\\)"):
        write_report(record, tmp_path, dataset=DATASET[:2])


def test_report_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    record = write_record(tmp_path / "grad_weights.jsonl", LINES)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'trl-dpo-ext\[plot\]'"):
        write_report(record, tmp_path)


def test_command_line_reads_the_output_dir_and_a_dataset_file(tmp_path, capsys):
    write_record(tmp_path / "grad_weights.jsonl", LINES)
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in DATASET[:2]) + json.dumps(DATASET[0]) + "\n")
    main([str(tmp_path), "--dataset", str(dataset), "--output-dir", str(tmp_path / "report"), "--top-fraction", "0.5"])
    assert "row 1: 0.800" in capsys.readouterr().out
    with open(tmp_path / "report" / "grad_weights_ranking.csv", encoding="utf-8") as file:
        table = list(csv.DictReader(file))
    assert [row["top"] for row in table] == ["True", "True", "False"]
    assert table[1]["prompt"] == "p0"  # row 2 of the file is a copy of row 0


def test_command_line_shows_each_rows_observations_and_warns_when_most_rest_on_one(tmp_path, capsys):
    # In the window (steps 3 and 4) rows 1 and 2 are seen once, row 0 twice: 2 of 3 ranked rows rest on one draw
    write_record(tmp_path / "grad_weights.jsonl", LINES)
    main([str(tmp_path), "--top-fraction", "1.0"])
    out = capsys.readouterr().out
    assert "row 1: 0.800 (1 observation)\n" in out and "row 0: 0.075 (2 observations)\n" in out
    assert "Warning: 2 of the 3 ranked rows rest on fewer than 2 observations" in out
    with open(tmp_path / "grad_weights_ranking.csv", encoding="utf-8") as file:
        assert [(row["index"], row["observations"]) for row in csv.DictReader(file)] == [
            ("1", "1"),
            ("2", "1"),
            ("0", "2"),
        ]


def test_no_warning_when_most_rows_are_observed_at_least_twice(tmp_path):
    # Every row seen at steps 3 and 4; row 2 also once more early, outside the window
    lines = [line(i, s, [0.1 * (i + 1)]) for s in (3, 4) for i in range(3)] + [line(2, 1, [0.5])]
    record = write_record(tmp_path / "grad_weights.jsonl", lines)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = write_report(record, tmp_path / "out")
    assert result["warning"] is None
    with pytest.warns(UserWarning, match="3 of the 3 ranked rows rest on fewer than 2 observations"):
        assert write_report(record, tmp_path / "out", last_fraction=0.25)["warning"] is not None
