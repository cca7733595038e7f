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


def test_report_html_figures_travel_inside_it_and_it_says_what_made_it(tmp_path):
    """The page's parts, from a hand-written results dict (the whole page of a real study is checked in
    tests/scenarios/test_mlflow_server.py)."""
    import base64
    import re

    from clinft_ray.report import _embedded, html_table, provenance_rows

    figure = tmp_path / "figures" / "uti_test.png"
    figure.parent.mkdir()
    figure.write_bytes(b"\x89PNG\r\n\x1a\n" + b"pixels")
    [src] = re.findall(r'<img src="([^"]+)"', _embedded(figure))
    assert base64.b64decode(src.removeprefix("data:image/png;base64,")) == figure.read_bytes()

    results = {"study": "uti-demo", "fingerprint": "f" * 64,
               "config": {"model": {"name_or_path": "meta-llama/x", "finetune": "lora", "dtype": "bfloat16"},
                          "seed": 3, "stats": {"seed": 0}},
               "fingerprint_inputs": {"tasks": [{"name": "uti", "splits": {"train": "a" * 64}}]}}
    page = html_table(provenance_rows(results, made="2026-12-01 20:00 UTC"))
    for said in ("meta-llama/x (lora, bfloat16)", "2026-12-01 20:00 UTC", "training 3, bootstrap 0",
                 "data uti/train sha256", "a" * 64, "ties go to fewer optimizer steps", "transformers "):
        assert said in page, said
