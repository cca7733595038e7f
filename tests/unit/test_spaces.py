"""Every shipped study config validates (keys, types, search spaces); only the data paths, which
point at the user's own files, are not required to exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from clinft_ray.config import StudyConfig
from clinft_ray.spaces import load_space

from helpers import REPO

STUDIES = sorted((REPO / "examples").rglob("*.yaml")) + sorted((REPO / "clinft_ray" / "demo").glob("study*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_study_validates(path):
    text = path.read_text()
    assert text.startswith("#"), "a shipped config starts with a comment showing the command that uses it"
    cfg = StudyConfig.model_validate(yaml.safe_load(text))
    if path.parent.name == "demo":
        spaces = {s: REPO / "tune_spaces" / Path(getattr(cfg, s).space).name for s in ("sft", "dpo")}
    else:
        spaces = {s: (path.parent / getattr(cfg, s).space).resolve() for s in ("sft", "dpo")}
    assert load_space(spaces["sft"], "sft").num_trials() >= 1
    assert load_space(spaces["dpo"], "dpo").num_trials() >= 1


@pytest.mark.parametrize("path", sorted((REPO / "tune_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_space_validates(path):
    assert path.read_text().startswith("#")
    stage = "dpo" if "dpo" in path.name else "sft"
    assert load_space(path, stage).num_trials() >= 1


OPTUNA = {"stage": "dpo", "learning_rate": {"loguniform": [1e-8, 1e-5]}, "beta": {"choice": [0.1, 0.3, 0.5]},
          "num_samples": 6, "max_steps": 100, "eval_steps": 10, "search": {"optuna": {"seed": 3}}}


@pytest.mark.parametrize(("change", "said"), [
    ({"learning_rate": {"grid": [1e-5, 1e-6]}}, "learning_rate cannot be a grid; write {loguniform"),
    ({"learning_rate": 1e-5, "beta": 0.1}, "search.optuna has nothing to search"),
    ({"search": {"optuna": {"max_concurrent": 0}}}, "max_concurrent"),
    ({"search": {"optuna": {"sed": 1}}}, "sed"),
])
def test_optuna_search_is_validated_like_the_grid(change, said):
    from clinft_ray.spaces import SearchSpace

    with pytest.raises(ValueError, match=re.escape(said)):
        SearchSpace.model_validate({**OPTUNA, **change})


def _score(config) -> float:  # a best dev score that peaks at lr 1e-6 and beta 0.3
    import math

    return -abs(math.log10(config["learning_rate"]) + 6) - abs(config["beta"] - 0.3)


def _suggestions(seed: int, n: int) -> list[tuple[float, float]]:
    """What the space's searcher suggests, driven through Tune's searcher interface as Tune drives it:
    suggest, then the finished trial's result."""
    from clinft_ray.spaces import SearchSpace

    space = SearchSpace.model_validate({**OPTUNA, "search": {"optuna": {"seed": seed}}})
    searcher = space.to_searcher("f1")
    searcher.set_search_properties(None, None, space.to_param_space())
    out = []
    for k in range(n):
        config = searcher.suggest(f"t{k}")
        searcher.on_trial_complete(f"t{k}", {"dev_best/f1": _score(config)})
        out.append((config["learning_rate"], config["beta"]))
    return out


def test_optuna_suggests_the_same_trials_for_a_seed(ray_session, tmp_path):
    """The space's searcher (Optuna's seeded TPE, one trial in flight): the same seed suggests the same
    configurations, another seed others, all inside the space; and a real Tune sweep with it runs
    exactly the configurations the searcher suggests for those scores."""
    from ray import tune

    from clinft_ray.spaces import SearchSpace

    first, again, other = _suggestions(3, 12), _suggestions(3, 12), _suggestions(4, 12)
    assert first == again and first != other
    assert all(1e-8 <= lr <= 1e-5 and beta in (0.1, 0.3, 0.5) for lr, beta in first + other)

    def trainable(config):  # self-contained: Tune's workers cannot import this test module
        import math

        score = -abs(math.log10(config["learning_rate"]) + 6) - abs(config["beta"] - 0.3)
        tune.report({"dev_best/f1": score, "step": 10})

    space = SearchSpace.model_validate({**OPTUNA, "num_samples": 3})
    grid = tune.Tuner(trainable, param_space=space.to_param_space(),
                      tune_config=tune.TuneConfig(num_samples=3, search_alg=space.to_searcher("f1")),
                      run_config=tune.RunConfig(storage_path=str(tmp_path), name="optuna", verbose=0)).fit()
    ran = sorted((r.config["learning_rate"], r.config["beta"]) for r in grid)
    assert ran == sorted(first[:3])
