"""Every error clinft-ray reports to a user, and the formatting of config errors: a leaf module that
config, spaces, data, preflight, judge and the study import, and that imports none of them.

Each error's message is what the user reads: one line per problem, naming the file, row or key, and
the fix; never a data row's text.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from typing import Any, get_args

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A config or search-space file is invalid. `problems` holds one line per problem; `sources` says
    where each came from (the file, or the `--set` override that set the key)."""

    def __init__(self, source: str, problems: list[str], sources: list[str] | None = None):
        self.source = source
        self.problems = problems
        self.sources = sources or [source] * len(problems)
        super().__init__("\n".join(f"{s}: {p}" for s, p in zip(self.sources, problems, strict=True)))


class DataError(ValueError):
    """A split is malformed. `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class PreflightError(RuntimeError):
    """The cluster, tracking server or storage cannot run this study as configured, or a study folder or
    registered model named on the command line cannot be used as asked."""


class JudgeError(RuntimeError):
    """The judge could not be reached or gave no usable grade (the message never quotes text)."""


class StudyError(RuntimeError):
    """The study cannot go on (every trial of a sweep failed, ...); the message says where to look."""


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config models inside a type: `X`, `list[X]`, `dict[str, X]`, `Annotated[A | B, ...]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _kind_tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("kind")
    return get_args(field.annotation)[0] if field is not None and get_args(field.annotation) else None


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at `loc` (the parent of an unknown key), for 'did you mean'."""
    models = [model]
    for part in loc:
        if isinstance(part, int):
            continue
        tagged = [m for m in models if _kind_tag(m) == part]  # pydantic puts a union's tag in the path
        if tagged:
            models = tagged
            continue
        found = [m for mod in models if (f := mod.model_fields.get(part)) for m in _models_in(f.annotation)]
        if found:
            models = found
        elif not any(part in mod.model_fields for mod in models):
            continue  # a dict key, such as a label set's name
        else:
            return []
    return sorted({name for m in models for name in m.model_fields})


# Parts of a pydantic error location that name a branch of a union, not a key of the file.
_BRANCH = re.compile(r"^(float|int|str|bool|none|fixed|[a-z-]+\[.*\])$")
_PATTERNS = {
    r"^[A-Za-z0-9][A-Za-z0-9_.-]*$": "a name of letters, digits, '_', '.' and '-' that starts with a letter or digit",
    r"^https?://": "an http:// or https:// URL",
}


def _accepts(e: dict[str, Any]) -> str:
    """What a key accepts, in words, from one pydantic error."""
    t, ctx = e["type"], e.get("ctx") or {}
    bounds = {"greater_than": "above", "greater_than_equal": "at least", "less_than": "below",
              "less_than_equal": "at most"}
    if t in bounds:
        bound = next(iter(ctx.values()))
        if t == "greater_than" and type(bound) is int and type(e.get("input")) is int:
            return f"a whole number of at least {bound + 1}"
        return f"a value {bounds[t]} {bound:g}" if isinstance(bound, float | int) else f"a value {bounds[t]} {bound}"
    if t == "literal_error":
        return ctx.get("expected", "one of its listed values")
    if t == "string_pattern_mismatch":
        return _PATTERNS.get(ctx.get("pattern", ""), f"text matching {ctx.get('pattern')}")
    if t == "too_short":
        return f"at least {ctx.get('min_length')} item(s)" if ctx.get("field_type") != "Value" else "a longer value"
    words = {"float": "a number", "int": "a whole number", "bool": "true or false", "string": "text",
             "list": "a list", "tuple": "a list", "dict": "a mapping (key: value)", "model": "a mapping (key: value)",
             "model_attributes": "a mapping (key: value)"}
    for prefix, word in words.items():
        if t.startswith(prefix + "_") or t == prefix:
            return word
    return e["msg"]


def _shown_value(value: Any) -> str:
    """A config value as an error may show it: short scalars as written, anything else by its kind."""
    if isinstance(value, bool | int | float) or value is None:
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else f"{value:g}" \
            if isinstance(value, float) else str(value)
    if isinstance(value, str) and len(value) <= 60:
        return repr(value)
    if isinstance(value, list | dict) and not value:
        return f"an empty {'list' if isinstance(value, list) else 'mapping'}"
    return {list: "a list", dict: "a mapping"}.get(type(value), f"a {type(value).__name__}")


def _key(loc: tuple, tags: Collection[str]) -> str:
    shown = []
    for i, p in enumerate(loc):
        if isinstance(p, str) and (_BRANCH.match(p) or (p in tags and i and isinstance(loc[i - 1], int))):
            continue
        if shown and shown[-1] == p and p in ("grid", "choice", "loguniform"):
            continue  # the tag of a swept value, then its own key
        shown.append(p)
    return ".".join(str(p) for p in shown) or "(top level)"


def _tag_line(key: str, e: dict[str, Any], known: Collection[str]) -> str:
    """A tagged union's tag is missing or unknown: `tasks.0.kind`, say which tags there are."""
    ctx = e.get("ctx") or {}
    field = ctx.get("discriminator", "").strip("'") or "kind"
    tags = re.findall(r"'([^']+)'", ctx.get("expected_tags", "")) or list(known)
    what = "a task kind" if field == "kind" else f"a {field}"
    if e["type"] == "union_tag_not_found":
        return f"{key}.{field}: required key is missing; add one of {', '.join(tags)}"
    tag = str(ctx.get("tag", ""))
    hint = difflib.get_close_matches(tag, tags, n=1)
    fix = f"did you mean {hint[0]!r}?" if hint else f"use one of {', '.join(tags)}"
    return f"{key}.{field}: {_shown_value(tag)} is not {what}; {fix}"


def format_errors(err: ValidationError, model: type[BaseModel], tags: Collection[str] = ()) -> list[str]:
    """One line per key: the dotted key, the value given (a short scalar; never a data row), and what
    the key accepts, with a "did you mean" for unknown keys and names. The errors pydantic gives for
    each branch of a union (`gpus_per_trial.float`, `gpus_per_trial.literal['auto']`) become one line.
    `tags`: the tags of the model's tagged unions in lists (the task kinds), left out of the keys shown."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for e in err.errors(include_url=False):
        by_key.setdefault(_key(tuple(e["loc"]), tags), []).append(e)
    lines = []
    for key, errors in by_key.items():
        plain = []
        for e in errors:
            if e["type"] == "extra_forbidden":
                known = _known_fields(model, tuple(e["loc"])[:-1])
                hint = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
                fix = f"did you mean {hint[0]!r}?" if hint else f"allowed keys here: {', '.join(known)}"
                lines.append(f"{key}: unknown key; {fix}")
            elif e["type"] == "missing":
                lines.append(f"{key}: required key is missing; add it")
            elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
                lines.append(_tag_line(key, e, tags))
            elif e["type"] == "value_error":
                msg = re.sub(r"^Value error, ", "", e["msg"])
                lines.append(msg if key == "(top level)" and re.match(r"^[a-z_][\w.]*: ", msg) else f"{key}: {msg}")
            else:
                plain.append(e)
        if plain:
            lines.append(_value_line(key, plain))
    return lines


def _value_line(key: str, errors: list[dict[str, Any]]) -> str:
    accepts = list(dict.fromkeys(_accepts(e) for e in errors))
    line = f"{key}: got {_shown_value(errors[0].get('input'))}; it takes {' or '.join(accepts)}"
    value, expected = errors[0].get("input"), [e["ctx"]["expected"] for e in errors if e["type"] == "literal_error"]
    if isinstance(value, str) and expected:
        hint = difflib.get_close_matches(value, re.findall(r"'([^']+)'", " ".join(expected)), n=1)
        if hint:
            line += f"; did you mean {hint[0]!r}?"
    return line
