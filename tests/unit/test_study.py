"""The study driver's own checks (`clinft_ray.study`): a stage that predicts one label for every test
example is flagged in one line without patient text."""

from __future__ import annotations

from clinft_ray.evaluate import Scored


def test_a_stage_that_predicts_one_label_for_all_is_flagged_in_one_line_without_text(caplog):
    import logging

    from clinft_ray.study import warn_one_prediction
    from clinft_ray.tasks import one_prediction

    same = {"correct_urgency": [True, False, True], "pred_urgency": ["urgent"] * 3,
            "pred_responder": ["physician", "medical assistant", None]}
    assert one_prediction(same) == {"pred_urgency": "urgent"}
    assert one_prediction({"pred": [None, None]}) == {"pred": None}  # nothing parsed, ever
    assert one_prediction({"pred": ["B"]}) == {}  # one example says nothing about a stage
    assert one_prediction({"score": [4.0, 4.0]}) == {}  # a score is not a prediction
    with caplog.at_level(logging.WARNING, logger="clinft"):
        warn_one_prediction("triage", "sft", Scored({}, ["a", "b", "c"], same, ["CANARY-PHI"] * 3))
        warn_one_prediction("triage", "dpo", Scored({}, ["a", "b"], {"pred_urgency": ["urgent", "non-urgent"]}, []))
    [record] = caplog.records
    msg = record.getMessage()
    assert "[triage] sft" in msg and "all 3 test examples" in msg and "pred_urgency 'urgent'" in msg
    assert "CANARY" not in msg and "\n" not in msg
