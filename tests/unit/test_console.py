"""What the console says of a sweep (`clinft_ray.console.TrialConsole`), for a hand-made sequence of
Tune events: one line per event, the sweep's progress in trial-steps, and the estimate of what is left."""

from __future__ import annotations

import logging

from clinft_ray.console import TrialConsole, clock, short_name


class Trial:
    def __init__(self, trial_id: str, name: str):
        self.trial_id, self.name, self.error_file = trial_id, name, None

    def __str__(self) -> str:
        return self.name


def test_one_line_per_trial_event_with_progress_and_time_left(caplog, monkeypatch):
    import clinft_ray.console as console

    now = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    say = TrialConsole("uti/sft", "uti-sft", "f1", max_steps=40, trials=2)
    a, b = Trial("a", "uti-sft-lr1e-03-00000"), Trial("b", "uti-sft-lr1e-04-00001")
    with caplog.at_level(logging.INFO, logger="clinft"):
        say.on_trial_start(0, [], a)
        now[0] = 110.0
        say.on_trial_result(0, [], a, {"step": 20, "dev/f1": 0.5})
        now[0] = 120.0
        say.on_trial_result(0, [], a, {"step": 40, "dev/f1": 0.25, "stopped": "dev plateau (1 evals without a better f1)"})
        say.on_trial_complete(0, [], a)
        say.on_trial_start(0, [], b)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "[uti/sft 0/80 trial-steps, 0:00] lr1e-03 started",
        # 20 steps in 10 s: the 60 steps left take ~30 s
        "[uti/sft 20/80 trial-steps, 0:10, ~0:30 left] lr1e-03 step 20: dev f1 0.500 (its best)",
        "[uti/sft 40/80 trial-steps, 0:20, ~0:20 left] lr1e-03 stopped at step 40: dev plateau (1 evals without a better f1)",
        "[uti/sft 40/80 trial-steps, 0:20, ~0:20 left] lr1e-03 finished, best dev f1 0.500 at step 20",
        "[uti/sft 40/80 trial-steps, 0:20, ~0:20 left] lr1e-04 started",
    ]


def test_names_and_clock():
    assert short_name("uti-dpo-beta0.1-lr1e-02-00003", "uti-dpo") == "beta0.1-lr1e-02"
    assert clock(75) == "1:15" and clock(3725) == "1:02:05"
