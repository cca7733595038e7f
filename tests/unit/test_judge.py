"""The judge client against a real OpenAI-compatible HTTP server on 127.0.0.1 (the demo's rule-based
judge): grades, Likert ratings, the on-disk cache, refusal of external endpoints, clear failures."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from clinft_ray.config import JudgeConfig
from clinft_ray.demo import judge_server
from clinft_ray.judge import Judge, JudgeError, parse_correct, parse_likert

CANARY = "CANARY-PHI-9042"


@pytest.fixture(scope="module")
def server():
    srv, url = judge_server.start()
    yield srv, url
    srv.shutdown()


def make_judge(url: str, tmp_path, **kw) -> Judge:
    return Judge(JudgeConfig(base_url=url, model="demo-rule-judge", **kw), tmp_path / "cache.sqlite")


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("CORRECT", True),
        ("CORRECT.", True),
        ("Correct", True),
        ("Verdict: CORRECT", True),
        ("The candidate answer is correct.", True),
        ("Correct.\n\nThe wording differs but the diagnosis is the same.", True),
        ("not incorrect", True),
        ("INCORRECT", False),
        ("incorrect, because", False),
        ("NOT CORRECT", False),  # not read as "CORRECT"
        ("The answer isn't correct.", False),
        ("Wrong", False),
        ("Incorrect. The correct answer is pyelonephritis.", False),  # "correct answer" is no verdict
        ("CORRECT or INCORRECT: INCORRECT", False),  # the rubric echoed, then the verdict
        ("Partially correct", False),  # a partial answer is not the same diagnosis or management
        ("Mostly correct, misses the antibiotic", False),
        ("Not entirely correct", False),
        ("Correct about the diagnosis but wrong about the treatment", False),
        ("maybe", None),
        ("Yes", None),
        ("", None),
    ],
)
def test_parse_correct(reply, verdict):
    assert parse_correct(reply) is verdict


@pytest.mark.parametrize(
    "reply, score",
    [
        ("4", 4),
        ("4.", 4),
        ("Rating: 4", 4),
        ("Score: 4/5", 4),
        ("4 out of 5", 4),
        ("1-5 scale: 4", 4),  # the scale is not the score
        ("(1-5): 2", 2),
        ("On a scale of 1 to 5, I would rate it a 4.", 4),
        ("Score: four", 4),
        ("5 - as good as the reference", 5),
        ("1 (useless or wrong)", 1),
        ("I give it a 3", 3),
        ("The summary has 3 sentences. Score: 4", 4),  # the number after "score"
        ("Score: 4 (good); it misses 2 facts", 4),
        ("7/10", None),  # another scale
        ("Rating: 6", None),  # outside 1-5
        ("4.5", None),  # not a point of the scale
        ("3-4", None),  # two scores
        ("", None),
    ],
)
def test_parse_likert(reply, score):
    assert parse_likert(reply) == score


def test_overlap_f1_hand_worked():
    """candidate 'a b c' vs reference 'a b d e': 2 common words, P = 2/3, R = 2/4, F1 = 2PR/(P+R) = 4/7."""
    assert judge_server.overlap_f1("a b c", "a b d e") == pytest.approx(4 / 7)


def test_grades_and_ratings_over_http(server, tmp_path):
    _, url = server
    judge = make_judge(url, tmp_path)
    q = [f"Question about {CANARY}", "Another question"]
    assert judge.grade_answers(q, ["Acute cystitis", "Pneumonia"], ["acute cystitis", "appendicitis"]) == [True, False]
    ratings = judge.rate_summaries(["note one", "note two"],
                                   ["Admitted with pneumonia, treated with ceftriaxone.", "Admitted with cellulitis."],
                                   ["Admitted with pneumonia, treated with ceftriaxone.", "Went home."])
    assert ratings == [5, 1]  # F1 1.0 -> 1 + 4 = 5; no overlap -> 1


def test_cache_answers_without_the_server_and_holds_no_text(server, tmp_path):
    srv, url = server
    judge = make_judge(url, tmp_path)
    args = ([f"q {CANARY}"] * 3, ["gold answer"] * 3, [f"gold answer {i}" for i in range(3)])
    first = judge.grade_answers(*args)
    served = judge_server._Handler.requests_served
    again = make_judge(url, tmp_path).grade_answers(*args)  # a new client, same cache file
    assert again == first and judge_server._Handler.requests_served == served
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("cache.sqlite"))
    assert CANARY.encode() not in raw and b"gold answer" not in raw


def test_unreachable_judge_fails_with_one_clear_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    judge = make_judge(f"http://127.0.0.1:{port}/v1", tmp_path, max_retries=0, timeout_s=2)
    with pytest.raises(JudgeError) as err:
        judge.grade_answers([f"q {CANARY}"], ["a"], ["a"])
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "judge.base_url" in msg and CANARY not in msg and "\n" not in msg


def test_external_endpoint_needs_explicit_opt_in():
    with pytest.raises(ValidationError, match="outside your network"):
        JudgeConfig(base_url="https://api.example.com/v1", model="gpt")
    assert JudgeConfig(base_url="https://api.example.com/v1", model="gpt", allow_external=True).allow_external
    for internal in ("http://127.0.0.1:8000/v1", "http://10.1.2.3/v1", "http://vllm:8000/v1",
                     "http://judge.hospital.internal/v1", "http://localhost:9/v1"):
        JudgeConfig(base_url=internal, model="m")


def test_reasoning_graded_by_the_judge_when_no_options(server, tmp_path):
    from clinft_ray.config import ReasoningTask
    from clinft_ray.data import Example
    from clinft_ray.tasks import reasoning_correct

    _, url = server
    task = ReasoningTask(name="r", kind="reasoning", grading="judge",
                         splits={s: f"{s}.jsonl" for s in ("train", "eval", "dev", "test")})
    examples = [Example("1", "q1", "Acute cystitis", "x"), Example("2", "q2", "B. Pneumonia", "x", {"A": "Flu", "B": "Pneumonia"})]
    served = judge_server._Handler.requests_served
    assert reasoning_correct(task, examples, ["acute cystitis", "A"], make_judge(url, tmp_path)) == [True, False]
    assert judge_server._Handler.requests_served == served + 1  # the option row is graded by its letter
