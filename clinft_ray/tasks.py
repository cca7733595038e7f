"""Task kinds: check a gold answer, turn a model's answer into a prediction, score, aggregate.

Each kind yields per-example outcomes (for the paired tests) and aggregate metrics (for selection
and the report):

| kind | outcome(s) per example | metrics | selection metric |
|---|---|---|---|
| classification | `correct`; `pred`, `gold` (labels) | `f1` (binary of `positive_label`, else macro), `accuracy` | `f1` |
| triage | `correct_<set>`; `pred_<set>`, `gold_<set>` per label set | `f1_<set>`, `accuracy_<set>`, `f1` = their mean | `f1` |
| reasoning | `correct` (option letter, normalized match, or judge); `pred`, `gold` (letters) with options | `accuracy` | `accuracy` |
| summarization | `score` (judge, 1-5) | `judge` (mean), `rougeL` | `judge` |

Every kind also reports `unparsed` and `unparsed_rate`: the answers that could not be read. Only
`correct*` and `score` are compared between stages; `pred*` and `gold*` (labels and letters, never
free text; None where an answer gives none) are there for a reader to audit. F1 and accuracy come
from scikit-learn, ROUGE-L from `rouge-score`.
"""

from __future__ import annotations

import itertools
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sklearn.metrics import accuracy_score, f1_score

from clinft_ray.config import ClassificationTask, ReasoningTask, TaskConfig, TriageTask
from clinft_ray.data import Example, load_split

NO_LABEL = "<none>"


def _norm(text: str) -> str:
    text = text.lower().translate(str.maketrans({c: " " for c in string.punctuation}))
    return re.sub(r"\s+", " ", text).strip()


# -- reading a free-text answer ---------------------------------------------------------------------
#
# NegEx-style rules (Chapman et al., J Biomed Inform 2001), simplified to what models write. The answer
# is cut into clauses at . ; , ! newlines and spaced dashes, and before but / however / although / though / whereas /
# yet / so / therefore / thus / hence / because / since: no cue reaches across a clause. Each mention
# of a label (whole words, longer labels first; "nonurgent" for "non-urgent" too) is then
# - negated by a cue before it ("no", "not", "without", "negative for", "ruled out", "unlikely",
#   "rather than", "instead of", "denies", "absence of", ...) ending at most 5 words before it with no
#   other label between, by "or"/"nor" after a negated label ("no UTI or pyuria"), or by a cue after
#   it within 3 words ("UTI is unlikely", "UTI ruled out", "physician not needed", a final "no":
#   "Urgent? No.");
# - not negated by phrases that only look negative ("cannot rule out", "not excluded", "no doubt",
#   "not sure", "not only"): a hedge that leans towards a label ("likely", "possible", "cannot rule
#   out") reads as that label, one that leans away ("unlikely", "less likely", "doubtful") as negation;
# - concluded when a conclusion cue ends at most 3 words before it ("consistent with", "suggests",
#   "indicates", "most likely", "more likely", "the answer is", "so", "therefore", ...);
# - leading when only lead-in words ("Answer:", "The diagnosis is", "I think", "This is a", a label
#   set's own name) or other label sets' mentions come before it in its clause.

_SPLIT = re.compile(r"[.;,!\n]+|\s[-–—]+\s|(?=\b(?:but|however|although|though|whereas|yet|so|therefore|thus|hence|because"
                    r"|since)\b)", re.I)
_PRE = {("no",), ("not",), ("without",), ("never",), ("neither",), ("nor",), ("unlikely",), ("doubtful",),
        ("improbable",), ("doubt",), ("denies",), ("deny",), ("denied",), ("exclude",), ("excludes",),
        ("excluded",), ("excluding",), ("against",), ("absent",), ("lacks",), ("lacking",), ("negative", "for"),
        ("ruled", "out"), ("rule", "out"), ("rules", "out"), ("less", "likely"), ("absence", "of"), ("free", "of"),
        ("lack", "of"), ("rather", "than"), ("instead", "of"), ("opposed", "to"), ("than",), ("low", "suspicion"),
        ("low", "probability"), ("low", "likelihood")}
_POST = {("unlikely",), ("doubtful",), ("improbable",), ("excluded",), ("absent",), ("negative",), ("wrong",),
         ("incorrect",), ("ruled", "out"), ("less", "likely"), ("not", "likely"), ("not", "present"),
         ("not", "supported"), ("not", "favored"), ("not", "favoured"), ("not", "suspected"), ("not", "indicated"),
         ("not", "needed"), ("not", "required"), ("not", "necessary"), ("not", "warranted"), ("not", "appropriate"),
         ("not", "the", "answer"), ("not", "the", "diagnosis"), ("not", "correct"), ("not", "really")}
_PSEUDO = {("not", "ruled", "out"), ("not", "rule", "out"), ("not", "be", "ruled", "out"), ("not", "exclude"),
           ("not", "excluded"), ("not", "be", "excluded"), ("no", "doubt"), ("without", "doubt"), ("not", "sure"),
           ("not", "certain"), ("not", "only"), ("less", "likely", "than")}
_CONCLUDE = {("so",), ("therefore",), ("thus",), ("hence",), ("consistent", "with"), ("indicates",),
             ("indicating",), ("indicative", "of"), ("suggests",), ("suggesting",), ("suggestive", "of"),
             ("diagnostic", "of"), ("most", "likely"), ("more", "likely"), ("answer", "is"), ("diagnosis", "is"),
             ("meets", "criteria", "for"), ("represents",), ("confirms",), ("favors",), ("favours",),
             ("classify", "as"), ("classified", "as"), ("less", "likely", "than")}
_LEAD_IN = frozenset("the a an my our final correct best answer is diagnosis classification label category triage "
                     "assessment impression prediction this it likely most probably probable i think would say "
                     "classify as choose pick select overall".split())


@dataclass(frozen=True)
class _Mention:
    label: str
    clause: int
    negated: bool
    concluded: bool
    leading: bool


def _words(text: str) -> list[str]:
    """Lower-cased words; "isn't" and "cannot" become "is not" and "can not"."""
    text = re.sub(r"n['’]t\b", " not", text.lower())
    return re.findall(r"[^\W_]+", re.sub(r"\bcannot\b", "can not", text))


def _forms(vocab: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(label, words) to look for, longest first; a multi-word label also as one word ("nonurgent")."""
    forms = []
    for label in vocab:
        w = tuple(_words(label))
        forms += [(label, w)] + ([(label, ("".join(w),))] if len(w) > 1 else [])
    return sorted((f for f in forms if f[1]), key=lambda f: (-len(f[1]), -len("".join(f[1]))))


def _spans(toks: list[str], phrases: set[tuple[str, ...]], lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of every phrase found within toks[lo:hi]."""
    hi = len(toks) if hi is None else hi
    return [(i, i + len(p)) for i in range(lo, hi) for p in phrases if tuple(toks[i : i + len(p)]) == p and i + len(p) <= hi]


def _find(toks: list[str], forms: list[tuple[str, tuple[str, ...]]]) -> list[tuple[int, int, str]]:
    found, i = [], 0
    while i < len(toks):
        hit = next(((i, i + len(w), lab) for lab, w in forms if tuple(toks[i : i + len(w)]) == w), None)
        found += [hit] if hit else []
        i = hit[1] if hit else i + 1
    return found


def _after(toks: list[str], end: int, nxt: int, blocked: set[int]) -> tuple[int, int] | None:
    """The span of a negation cue right after a mention (ending at `end`; the next mention starts at `nxt`)."""
    for s, e in sorted(_spans(toks, _POST, end, min(end + 4, nxt) if nxt > end else end), key=lambda se: se[0]):
        if e <= nxt and not blocked & set(range(s, e)):
            return s, e
    last = len(toks) - 1  # "Urgent? No." / "Physician: not"
    if nxt == len(toks) and end <= last <= end + 1 and toks[last] in ("no", "not") and last not in blocked:
        return last, last + 1
    return None


def _read(text: str, vocab: list[str], lead_in: frozenset[str] = _LEAD_IN) -> list[_Mention]:
    """Every mention of a label of `vocab` in `text`, with how the answer says it (see the rules above)."""
    forms, out = _forms(vocab), []
    for c, clause in enumerate(_SPLIT.split(text)):
        toks = _words(clause or "")
        pseudo = {i for s, e in _spans(toks, _PSEUDO) for i in range(s, e)}
        found = _find(toks, forms)
        covered: set[int] = set()
        blocked, prev_end, prev_neg = set(pseudo), 0, False
        for k, (s, e, label) in enumerate(found):
            nxt = found[k + 1][0] if k + 1 < len(found) else len(toks)
            before = [(a, b) for a, b in _spans(toks, _PRE, prev_end, s) if s - b <= 5 and not blocked & set(range(a, b))]
            negated = bool(before) or (prev_neg and toks[prev_end:s] in (["or"], ["nor"]))
            post = _after(toks, e, nxt, blocked)
            if post:
                negated = True
                blocked |= set(range(*post))
            concluded = any(s - b <= 3 for a, b in _spans(toks, _CONCLUDE, prev_end, s))
            leading = all(toks[i] in lead_in for i in range(s) if i not in covered)
            out.append(_Mention(label, c, negated, concluded and not negated, leading))
            covered |= set(range(s, e))
            prev_end, prev_neg = (post[1] if post else e), negated
    return out


def _decide(mentions: list[_Mention], labels: list[str]) -> str:
    """The label of `labels` that the mentions give, or NO_LABEL (see `parse_label`)."""
    ms = [m for m in mentions if m.label in labels]
    if not ms:
        return NO_LABEL
    first = [m for m in ms if m.clause == ms[0].clause]
    if first[0].leading and not first[0].negated and {m.label for m in first if not m.negated} == {first[0].label}:
        return first[0].label
    concluded = {m.label for m in ms if m.concluded}
    if len(concluded) == 1:
        return concluded.pop()
    negated = {m.label for m in ms if m.negated}
    affirmed = {m.label for m in ms if not m.negated}
    if len(affirmed) > 1 or affirmed & negated:
        return NO_LABEL
    if affirmed:
        return affirmed.pop()
    if len(labels) == 2 and len(negated) == 1:
        return next(lab for lab in labels if lab not in negated)
    return NO_LABEL


def parse_label(text: str, labels: list[str]) -> str:
    """The label a free-text answer gives, read as a clinician would read it, else `NO_LABEL`.

    Robust to case, punctuation and an explanation. Labels are whole words, longer labels first so that
    "non-urgent" is not read as "urgent". In order:
    1. the answer leads with one label ("UTI.", "Answer: pyuria", "Likely UTI; pyuria is also present",
       "Pyuria, not UTI"): that label, whatever the explanation after it mentions;
    2. else one label is concluded ("..., consistent with a UTI", "more likely pyuria"): that label;
    3. else exactly one label is said without negation, and nowhere negated: that label. Two different
       labels said without negation ("possible UTI or pyuria"), or one label both said and negated,
       are ambiguous: `NO_LABEL`, never the first one;
    4. else, with exactly two labels, one of them negated and the other never mentioned ("No UTI",
       "not urgent", "negative for sepsis", "does not need a physician"): the other label, because the
       task's two labels are exhaustive and exclusive. With more labels a negation picks nothing.
    Negation and hedges follow the NegEx-style rules above this function: "unlikely", "ruled out",
    "less likely" and "doubtful" negate; "likely", "possible" and "cannot rule out" do not.
    """
    return _decide(_read(text, labels), labels)


def label_metrics(labels: list[str], positive: str | None, gold: list[str], pred: list[str]) -> dict[str, float]:
    """F1 and accuracy. An unparseable answer counts as wrong (its own class, never a positive)."""
    if positive is not None:
        # F1 of the positive class; `labels=` (not average="binary") tolerates NO_LABEL predictions.
        f1 = f1_score(gold, pred, labels=[positive], average="macro", zero_division=0.0)
    else:
        f1 = f1_score(gold, pred, labels=labels, average="macro", zero_division=0.0)
    return {"f1": float(f1), "accuracy": float(accuracy_score(gold, pred))}


def classification_metrics(task: ClassificationTask, gold: list[str], pred: list[str]) -> dict[str, float]:
    return label_metrics(task.labels, task.positive_label, gold, pred)


def unparsed(missed: list[bool]) -> dict[str, float]:
    """`unparsed`: how many answers could not be read (no label, no option, an empty answer), and
    `unparsed_rate`: their share of the split."""
    n = sum(missed)
    return {"unparsed": n, "unparsed_rate": n / len(missed) if missed else 0.0}


def _shown(label: str) -> str | None:
    return None if label == NO_LABEL else label


def classification_scores(task: ClassificationTask, examples: list[Example], preds: list[str]) -> tuple[dict, dict]:
    """(metrics, outcomes) from the predicted labels: `f1`, `accuracy`, `unparsed`, `unparsed_rate`;
    per example `correct`, and `pred` / `gold`: the predicted label (None when unparsed) and the gold
    one, so that a reader of `outcomes.jsonl` can build the confusion matrix."""
    gold = [e.chosen for e in examples]
    metrics = {**classification_metrics(task, gold, preds), **unparsed([p == NO_LABEL for p in preds])}
    return metrics, {"correct": [g == p for g, p in zip(gold, preds, strict=True)],
                     "pred": [_shown(p) for p in preds], "gold": gold}


# -- triage ------------------------------------------------------------------------------------------

def parse_triage(text: str, task: TriageTask) -> dict[str, str]:
    """One label per label set, each read from the same answer as `parse_label` reads it. The other
    sets' labels end a negation's reach ("not urgent; physician" negates only "urgent"), and a set's
    name may lead in its label ("Urgency: urgent. Responder: physician")."""
    vocab = [lab for ls in task.label_sets.values() for lab in ls.labels]
    lead_in = _LEAD_IN | {w for name in task.label_sets for w in _words(name)}
    mentions = _read(text, vocab, lead_in)
    return {name: _decide(mentions, ls.labels) for name, ls in task.label_sets.items()}


def triage_answers(task: TriageTask) -> list[dict[str, str]]:
    """Every combination of labels, for log-likelihood scoring."""
    names = list(task.label_sets)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(task.label_sets[n].labels for n in names))]


def triage_scores(task: TriageTask, examples: list[Example], preds: list[dict[str, str]]) -> tuple[dict, dict]:
    """(metrics, outcomes): F1 and accuracy per label set, `f1` their mean, `unparsed` (answers that
    give no label for some set) and `unparsed_rate`; per example `correct_<set>`, and `pred_<set>` /
    `gold_<set>`: the predicted label (None when unparsed) and the gold one."""
    metrics: dict[str, float] = {}
    outcomes: dict[str, list[Any]] = {}
    golds = [parse_triage(e.chosen, task) for e in examples]
    for name, ls in task.label_sets.items():
        gold = [g[name] for g in golds]
        pred = [p[name] for p in preds]
        m = label_metrics(ls.labels, ls.positive_label, gold, pred)
        metrics[f"f1_{name}"], metrics[f"accuracy_{name}"] = m["f1"], m["accuracy"]
        outcomes[f"correct_{name}"] = [g == p for g, p in zip(gold, pred, strict=True)]
        outcomes[f"pred_{name}"], outcomes[f"gold_{name}"] = [_shown(p) for p in pred], gold
    metrics["f1"] = sum(metrics[f"f1_{n}"] for n in task.label_sets) / len(task.label_sets)
    metrics.update(unparsed([NO_LABEL in p.values() for p in preds]))
    return metrics, outcomes


def one_prediction(outcomes: dict[str, list[Any]]) -> dict[str, Any]:
    """The predictions (`pred`, `pred_<set>`) that are the same for every one of two or more examples,
    by outcome name: a stage that answers one label (or one letter, or nothing: None) to every
    question tells little, whatever its metric."""
    return {k: v[0] for k, v in outcomes.items() if k.startswith("pred") and len(v) > 1 and len(set(v)) == 1}


# -- reasoning -------------------------------------------------------------------------------------

# A letter stated as a pick: "(C)", "[C]", "C)", "C.", "C:", "C -", or a capital "C" alone or before a
# space. "A" and "I" before a word are an article and a pronoun ("A urinary tract infection", "I think");
# "D-dimer" and "C-reactive" are not letters.
_LETTER = r"(?:[(\[]\s*(?P<b>[A-Za-z])\s*[)\]]|(?P<p>[A-Za-z])(?:\)|[.:](?!\w)|\s+[-–—]\s|\s*$)|(?-i:(?P<w>[B-HJ-Z]))(?=\s|$)" \
          r"|(?P<a>[AI])(?=\s+(?:because|since|as|given|due)\b))"
_PICK = re.compile(rf"^\W*(?:(?:the|my)\s+)?(?:(?:correct|best|final|right|most\s+likely)\s+)?(?:answer\s*(?:is\s*)?"
                   rf"(?:[:\-]\s*)?|option\s+|choice\s+|i\s+(?:would\s+)?(?:choose|pick|select|go\s+with)\s+"
                   rf"(?:option\s+)?)?{_LETTER}", re.I)
_ANSWER_IS = re.compile(rf"\banswer\s*(?:is\s*|:\s*)(?:option\s+)?{_LETTER}", re.I)
_NAMED = re.compile(r"\b(?:option|choice)\s+\(?(?P<l>[A-Za-z])\)?(?!\w)|[(\[]\s*(?P<b>[A-Za-z])\s*[)\]]", re.I)
_NOT_BEFORE = re.compile(r"\b(?:not|no|than|instead\s+of|exclude|excluding|rule\s+out|ruled\s+out)\s+(?:\w+\s+)?$", re.I)
_NOT_AFTER = re.compile(r"^\s*(?:is\s+|would\s+be\s+|seems\s+)?(?:incorrect|wrong|unlikely|less\s+likely|not\b)", re.I)


def _letter(m: re.Match) -> str:
    return next(g for g in m.groupdict().values() if g).upper()


def option_letter(text: str, options: dict[str, str]) -> str | None:
    """The option an answer picks, or None when it picks none or is ambiguous. In order:
    1. a letter it starts with, after an optional lead-in: "C", "(C)", "C. ...", "C) ...", "[C]",
       "Answer: C", "The answer is (C)", "Option C", "I would choose C"; "A" before a word is the
       article ("A urinary tract infection" is not option A), unless "because"/"since" follows;
    2. else the one letter after "answer is" / "answer:" anywhere ("..., so the answer is (C)");
    3. else the one letter named "option C", "choice C" or "(C)" anywhere and not negated ("not
       option A", "option A is wrong");
    4. else the option whose text it states, read as `parse_label` reads labels ("Likely acute
       appendicitis; not cystitis"): two options stated without negation pick none.
    A letter that is not one of `options` picks nothing.
    """
    m = _PICK.match(text)
    if m and _letter(m) in options:
        return _letter(m)
    for found in ([_letter(m) for m in _ANSWER_IS.finditer(text)],
                  [_letter(m) for m in _NAMED.finditer(text)
                   if not _NOT_BEFORE.search(text[: m.start()]) and not _NOT_AFTER.match(text[m.end() :])]):
        letters = {x for x in found if x in options}
        if len(letters) == 1:
            return letters.pop()
        if len(letters) > 1:
            return None
    by_text = {str(v): k for k, v in options.items()}
    said = _decide(_read(text, list(by_text)), list(by_text))
    return None if said == NO_LABEL else by_text[said]


def answer_matches(answer: str, gold: str) -> bool:
    """Normalized match: the gold answer, ignoring case and punctuation, is what the answer says or
    how it starts."""
    a, g = _norm(answer), _norm(gold)
    return bool(g) and (a == g or a.startswith(g + " "))


def reasoning_correct(task: ReasoningTask, examples: list[Example], answers: list[str], judge: Any) -> list[bool]:
    """Correct per example: option letters where a row has `options`, else match or the judge."""
    correct: list[bool | None] = []
    for e, a in zip(examples, answers, strict=True):
        if e.options:
            correct.append(option_letter(a, e.options) == option_letter(e.chosen, e.options))
        elif task.grading == "match":
            correct.append(answer_matches(a, e.chosen))
        else:
            correct.append(None)
    pending = [i for i, c in enumerate(correct) if c is None]
    if pending:
        graded = judge.grade_answers([prompt_text(examples[i].prompt) for i in pending],
                                     [examples[i].chosen for i in pending], [answers[i] for i in pending])
        for i, g in zip(pending, graded, strict=True):
            correct[i] = g
    return [bool(c) for c in correct]


def reasoning_scores(task: ReasoningTask, examples: list[Example], answers: list[str], judge: Any) -> tuple[dict, dict]:
    """(metrics, outcomes): `accuracy`, `unparsed` (option rows whose answer picks no option, and empty
    answers) and `unparsed_rate`; per example `correct`, and where rows have options `pred` / `gold`:
    the option letter picked (None when none) and the gold one (None on rows without options)."""
    correct = reasoning_correct(task, examples, answers, judge)
    picks = [option_letter(a, e.options) if e.options else None for e, a in zip(examples, answers, strict=True)]
    missed = [not a.strip() or bool(e.options and p is None) for e, a, p in zip(examples, answers, picks, strict=True)]
    outcomes: dict[str, list[Any]] = {"correct": correct}
    if any(e.options for e in examples):
        outcomes["pred"] = picks
        outcomes["gold"] = [option_letter(e.chosen, e.options) if e.options else None for e in examples]
    return {"accuracy": sum(correct) / len(correct), **unparsed(missed)}, outcomes


# -- summarization ---------------------------------------------------------------------------------

def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score, with stemming)."""
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure)


def summary_scores(examples: list[Example], summaries: list[str], judge: Any) -> tuple[dict, dict]:
    """(metrics, outcomes): `judge` (the mean 1-5 rating), `rougeL`, `unparsed` (empty summaries) and
    `unparsed_rate`; per example `score`, the judge's rating."""
    ratings = judge.rate_summaries([prompt_text(e.prompt) for e in examples], [e.chosen for e in examples], summaries)
    rouge = [rouge_l(s, e.chosen) for s, e in zip(summaries, examples, strict=True)]
    metrics = {"judge": sum(ratings) / len(ratings), "rougeL": sum(rouge) / len(rouge),
               **unparsed([not s.strip() for s in summaries])}
    return metrics, {"score": [float(r) for r in ratings]}


# -- shared ----------------------------------------------------------------------------------------

def prompt_text(prompt: Any) -> str:
    """A prompt as plain text (chat messages joined), for the judge."""
    return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)


def gold_check(task: TaskConfig) -> Callable[[dict[str, Any]], str | None]:
    """A per-row check of the gold answer for the task's kind: a problem (no row text) or None."""

    def check(row: dict[str, Any]) -> str | None:
        gold = str(row["chosen"]).strip()
        if isinstance(task, ClassificationTask) and gold not in task.labels:
            return f"'chosen' is not one of the task's labels {task.labels}; fix the label"
        if isinstance(task, TriageTask):
            parsed = parse_triage(gold, task)
            bad = [n for n, lab in parsed.items() if lab == NO_LABEL]
            if bad:
                return (f"'chosen' names no label of set(s) {bad}; write it as "
                        f"{task.template!r} with labels from {[task.label_sets[n].labels for n in bad]}")
        options = row.get("options")
        if isinstance(task, ReasoningTask) and options is not None:
            if not isinstance(options, dict) or not options:
                return "'options' must map letters to answer texts, e.g. {\"A\": ..., \"B\": ...}"
            if option_letter(gold, {str(k).upper(): str(v) for k, v in options.items()}) is None:
                return f"'chosen' picks none of the options {sorted(options)}; start it with the option letter"
        return None

    return check


def load_task_split(task: TaskConfig, split: str) -> list[Example]:
    """One split of a task, with the checks of its kind."""
    return load_split(getattr(task.splits, split), gold_check(task))
