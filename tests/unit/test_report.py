"""The report's tables from a hand-written results dict: the unparsed-answer column."""

from __future__ import annotations

from clinft_ray.report import markdown, metrics_rows


def test_metrics_table_has_an_unparsed_column_out_of_the_test_rows():
    stages = {"base": {"f1": 0.5, "accuracy": 0.25, "unparsed": 12, "unparsed_rate": 0.06},
              "sft": {"f1": 0.9, "accuracy": 0.9, "unparsed": 0, "unparsed_rate": 0.0},
              "dpo": {"f1": 0.95, "accuracy": 0.95}}  # a results.json written before unparsed was counted
    results = {"tasks": {"uti": {"n_test": 200, "stages": {s: {"test": m} for s, m in stages.items()}}}}
    head, rows = metrics_rows(results)
    assert head == ["task", "stage", "metrics on test", "unparsed"]
    assert rows[0] == ["uti", "base", "f1 0.500, accuracy 0.250", "12 / 200"]  # the count, not among the metrics
    assert rows[1][3] == "0 / 200" and rows[2][3] == "-"
    table = markdown((head, rows))
    assert "| task | stage | metrics on test | unparsed |" in table and "| uti | base | f1 0.500, accuracy 0.250 | 12 / 200 |" in table
