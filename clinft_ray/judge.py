"""An LLM judge over any OpenAI-compatible chat-completions endpoint (vLLM, TGI, a hosted API).

It grades open-ended answers (correct / incorrect against the gold answer) and rates summaries on a
1-5 Likert scale with a rubric (the paper's "2-3 sentences for an internist"). Temperature 0 by
default, at most `concurrency` requests in flight, retries with exponential backoff (the `openai`
client's own), and an on-disk cache so a resumed study never pays for the same grade twice.

The cache is a sqlite file keyed by a sha256 of (model, messages, temperature) and holds only the
parsed grade, never the text sent or received: the text is patient data. Sending that text to an
endpoint outside the user's network is refused unless the config opts in (`judge.allow_external`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from clinft_ray.config import JudgeConfig
from clinft_ray.errors import JudgeError

CORRECTNESS_RUBRIC = (
    "You grade answers to clinical questions. Compare the candidate answer with the reference answer. "
    "The candidate is correct if it states the same diagnosis or management as the reference, even in "
    "other words. Reply with exactly one word: CORRECT or INCORRECT."
)
SUMMARY_RUBRIC = (
    "You rate summaries of clinical notes written for an internist. A good summary is 2-3 sentences, "
    "states the main diagnosis, the key treatment and the follow-up, and adds nothing that is not in "
    "the note. Compare the candidate with the reference summary and rate the candidate from 1 (useless "
    "or wrong) to 5 (as good as the reference). Reply with a single digit from 1 to 5."
)




def _sections(**parts: str) -> str:
    return "\n\n".join(f"### {name.replace('_', ' ').title()}\n{text}" for name, text in parts.items())


_ECHO = re.compile(r"\b(?:in)?correct\s*(?:or|/)\s*(?:in)?correct\b")  # the rubric's "CORRECT or INCORRECT"
_VERDICT = re.compile(r"\b(?:(?P<mod>not|partially|partly|mostly|largely|somewhat|half|nearly|almost|not\s+entirely"
                      r"|not\s+fully|not\s+completely|not\s+totally)\s+)?(?P<word>incorrect|correct|wrong)\b"
                      r"(?!\s+(?:answer|diagnosis|option|management|treatment|choice)\b)")
_VERDICT_LEAD = re.compile(r"^\W*(?:(?:verdict|grade|answer|result|judgement|judgment)\s*[:\-]?\s*)?"
                           r"(?:the\s+)?(?:candidate(?:\s+answer)?\s+is\s+)?$")


def _verdict(m: re.Match) -> bool:
    mod, correct = m.group("mod"), m.group("word") == "correct"
    if mod == "not":
        return not correct  # "not correct" is incorrect, "not incorrect" correct
    return correct and mod is None  # "partially correct", "not entirely correct": incorrect


def parse_correct(reply: str) -> bool | None:
    """The judge's verdict: True for correct, False for incorrect, None when it gives none.

    Reads "CORRECT", "Correct.", "The candidate is correct" as correct; "INCORRECT", "NOT CORRECT",
    "isn't correct", "Wrong" as incorrect. A partial verdict ("partially correct", "mostly correct",
    "not entirely correct") is incorrect: the rubric asks for the same diagnosis or management, and a
    partly right answer does not give it. A verdict the reply leads with, as a sentence of its own,
    wins ("Incorrect. The candidate is right that ... but ..."; "correct answer" and the like are not
    verdicts); else the verdicts it gives, all the same, or incorrect when they differ ("correct
    about the diagnosis but wrong about the treatment" is partial). An echo
    of the rubric ("CORRECT or INCORRECT") is not a verdict; "yes" and "no" are none.
    """
    text = _ECHO.sub(" ", re.sub(r"n['’]t\b", " not", reply.lower()))
    found = list(_VERDICT.finditer(text))
    if not found:
        return None
    first = found[0]
    if _VERDICT_LEAD.match(text[: first.start()]) and re.match(r"\s*(?:[.!;:,\n]|$)", text[first.end() :]):
        return _verdict(first)
    return all(_verdict(m) for m in found)


_NUMBER_WORDS = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}
_NUM = r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w]|\.\d)"
_OUT_OF = re.compile(rf"{_NUM}\s*(?:/|out\s+of|of)\s*(\d+)\b")
_SCALE = re.compile(r"(?<![\w.])1\s*(?:-|–|to|and)\s*5(?![\w.]|\.\d)")
_SCORE_LEAD = re.compile(rf"\b(?:rating|rated|rate|score|scored|grade|graded|likert|give\s+(?:it|this)(?:\s+a)?)\W{{0,12}}?"
                         rf"(?:it\s+|this\s+|a\s+|as\s+)*{_NUM}")


def parse_likert(reply: str) -> int | None:
    """A 1-5 rating, or None when the reply gives none or an unclear one.

    Reads "4", "Rating: 4", "Score: 4/5", "4 out of 5", "1-5 scale: 4", "On a scale of 1 to 5, I would
    rate it a 4", "four". The scale ("1-5", "1 to 5") is not a score. In order: a score out of 5; else
    the number after "rating" / "score" / "rate"; else the one number in the reply. A score on another
    scale ("7/10"), outside 1-5, not whole ("4.5"), or two different numbers ("3-4") is None.
    """
    text = re.sub(r"\b(?:one|two|three|four|five)\b", lambda m: _NUMBER_WORDS[m.group()], reply.lower())
    out_of = _OUT_OF.findall(text)
    if out_of:
        return _likert({n for n, d in out_of}) if {d for _, d in out_of} == {"5"} else None
    text = _SCALE.sub(" ", text)
    lead = _SCORE_LEAD.search(text)
    return _likert({lead.group(1)} if lead else set(re.findall(_NUM, text)))


def _likert(numbers: set[str]) -> int | None:
    if len(numbers) != 1:
        return None
    n = numbers.pop()
    return int(n) if n in {"1", "2", "3", "4", "5"} else None


class Judge:
    """Grades through the configured endpoint, with a cache at `cache_path`."""

    def __init__(self, cfg: JudgeConfig, cache_path: Path):
        from openai import OpenAI

        self.cfg = cfg
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self.client = OpenAI(base_url=cfg.base_url, api_key=key or "not-needed", max_retries=cfg.max_retries,
                             timeout=cfg.timeout_s)
        self.cache_path = Path(cache_path)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, shared by the worker threads in turn
        self._db = sqlite3.connect(self.cache_path, timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")  # trials of a sweep share the file
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS grades (key TEXT PRIMARY KEY, grade TEXT NOT NULL)")

    def _key(self, messages: list[dict[str, str]]) -> str:
        blob = json.dumps([self.cfg.model, self.cfg.temperature, messages], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _ask(self, messages: list[dict[str, str]], parse: Callable[[str], Any]) -> Any:
        key = self._key(messages)
        with self._lock:
            hit = self._db.execute("SELECT grade FROM grades WHERE key = ?", (key,)).fetchone()
        if hit is not None:
            return json.loads(hit[0])
        for _ in range(2):  # one more try when the reply has no grade in it
            try:
                reply = self.client.chat.completions.create(
                    model=self.cfg.model, messages=messages, temperature=self.cfg.temperature, max_tokens=8)
            except Exception as exc:  # the openai client has already retried with backoff
                raise JudgeError(f"judge at {self.cfg.base_url} failed after {self.cfg.max_retries} retries "
                                 f"({type(exc).__name__}); check judge.base_url and that the server is up") from None
            grade = parse(reply.choices[0].message.content or "")
            if grade is not None:
                with self._lock, self._db:
                    self._db.execute("INSERT OR REPLACE INTO grades VALUES (?, ?)", (key, json.dumps(grade)))
                return grade
        raise JudgeError(f"judge model {self.cfg.model!r} replied without a grade twice; check its rubric")

    def _grade(self, rubric: str, cases: list[dict[str, str]], parse: Callable[[str], Any]) -> list[Any]:
        """One request per case (its sections under the rubric), `concurrency` at a time."""
        prompts = [[{"role": "system", "content": rubric}, {"role": "user", "content": _sections(**c)}] for c in cases]
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(lambda m: self._ask(m, parse), prompts))

    def grade_answers(self, questions: list[str], references: list[str], answers: list[str]) -> list[bool]:
        """Correct / incorrect for each answer against its reference."""
        cases = [{"question": q, "reference": r, "candidate": a}
                 for q, r, a in zip(questions, references, answers, strict=True)]
        return self._grade(self.cfg.correctness_rubric or CORRECTNESS_RUBRIC, cases, parse_correct)

    def rate_summaries(self, sources: list[str], references: list[str], summaries: list[str]) -> list[int]:
        """A 1-5 Likert rating for each summary."""
        cases = [{"note": s, "reference": r, "candidate": c}
                 for s, r, c in zip(sources, references, summaries, strict=True)]
        return self._grade(self.cfg.summary_rubric or SUMMARY_RUBRIC, cases, parse_likert)


def judge_for(study: Any) -> Judge | None:
    """The study's judge (cache in the output directory), or None when the config has none."""
    cfg = study.config
    return None if cfg.judge is None else Judge(cfg.judge, cfg.output_dir / "judge-cache.sqlite")
