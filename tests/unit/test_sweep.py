"""The driver's sweep (`clinft_ray.sweep`): what it hands Ray. The sweep itself runs in the scenarios."""

from __future__ import annotations

import os


def test_aws_keys_are_withheld_from_ray_unless_the_storage_is_on_s3(monkeypatch):
    """Around `ray.init` and `Tuner.fit` the AWS keys leave the environment when the storage does not
    need them (Tune would copy them into every trial's runtime environment, which Ray logs), and come
    back after, for MLflow's client; S3 storage keeps them, since the trials write to it."""
    from clinft_ray.sweep import AWS_KEYS, keys_withheld

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")  # not a secret: stays
    for storage in ("/mnt/shared/ray", "file:///mnt/shared/ray", "gs://bucket/ray"):
        with keys_withheld(storage):
            assert not [k for k in AWS_KEYS if k in os.environ] and os.environ["AWS_REGION"] == "eu-west-1"
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == "secret" and os.environ["AWS_SESSION_TOKEN"] == "token"
    with keys_withheld("s3://bucket/ray"):
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == "secret"
