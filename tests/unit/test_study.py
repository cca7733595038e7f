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


def test_a_cluster_job_with_aws_keys_in_its_environment_is_warned_once(demo_dir, ray_session, monkeypatch, caplog):
    """A cluster job's driver that sees AWS keys says, in one line, what Ray does with them where the
    storage is on S3 (copied into every trial's runtime environment, logged in plain text) and what to
    do instead; with other storage, that clinft-ray does not pass them on. The key's value is never
    printed."""
    import logging

    from clinft_ray.config import load_study
    from clinft_ray.study import start_ray

    monkeypatch.setenv("RAY_ADDRESS", ray_session.get_runtime_context().gcs_address)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "clinft-canary-secret-5521")
    study = load_study(demo_dir / "study.yaml")
    with caplog.at_level(logging.WARNING, logger="clinft"):
        start_ray(study)  # the session's Ray is up: it is joined, not started
        s3 = study.model_copy(update={"config": study.config.model_copy(update={"storage_path": "s3://bucket/x"})})
        start_ray(s3)
    local, on_s3 = (r.getMessage() for r in caplog.records)
    assert "AWS_SECRET_ACCESS_KEY is set" in local and "does not pass them on" in local
    assert "runtime_env_agent.log" in on_s3 and "instance or pod role" in on_s3
    assert "canary" not in local + on_s3
