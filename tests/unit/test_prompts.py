"""Prompt sets: shipped files, paths, inline lists, errors, and the resumable sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tdpo import prompts
from tdpo.errors import UsageError
from tdpo.prompts import PromptSampler, available_prompt_sets, load_prompts, register_prompt_set


@pytest.mark.parametrize(
    ("name", "count"), [("simple_animals", 45), ("hpsv2_photo", 800), ("unseen_animals", 40)]
)
def test_shipped_sets_load_with_their_counts(name: str, count: int) -> None:
    loaded = load_prompts(name)
    assert len(loaded) == count
    assert all(p and p == p.strip() for p in loaded)
    assert name in available_prompt_sets()


def test_unseen_animals_are_unseen() -> None:
    unseen = load_prompts("unseen_animals")
    assert len(set(unseen)) == len(unseen)
    assert not set(unseen) & set(load_prompts("simple_animals"))


def test_file_path_skips_blank_and_comment_lines(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("# my prompts\na red circle\n\n  a blue square  \n#skip\n")
    assert load_prompts(str(path)) == ["a red circle", "a blue square"]


def test_inline_list() -> None:
    assert load_prompts(["a cat", " a dog "]) == ["a cat", "a dog"]


@pytest.mark.parametrize("spec", [[], ["a cat", ""]])
def test_empty_inline_list_is_a_usage_error(spec: list[str]) -> None:
    with pytest.raises(UsageError) as error:
        load_prompts(spec, field="prompts.eval")
    assert error.value.field == "prompts.eval"


def test_unknown_name_names_the_choices() -> None:
    with pytest.raises(UsageError) as error:
        load_prompts("simple_animalz")
    message = str(error.value)
    assert error.value.field == "prompts.train"
    assert "simple_animals" in message and "hpsv2_photo" in message and "unseen_animals" in message


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such prompt file"):
        load_prompts(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(UsageError, match="empty"):
        load_prompts(str(empty))


def test_registered_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompts, "_REGISTRY", {})
    register_prompt_set("shapes_test", lambda: ["a red circle", "a green square"])
    assert "shapes_test" in available_prompt_sets()
    assert load_prompts("shapes_test") == ["a red circle", "a green square"]
    with pytest.raises(ValueError):
        register_prompt_set("simple_animals", lambda: ["x"])


def test_sampler_is_deterministic_and_uniform_with_replacement() -> None:
    pool = [f"p{i}" for i in range(5)]
    a, b = PromptSampler(pool, seed=3), PromptSampler(pool, seed=3)
    draws = a.sample(2000)
    assert draws == b.sample(2000)
    assert PromptSampler(pool, seed=4).sample(50) != draws[:50]
    counts = [draws.count(p) for p in pool]
    assert min(counts) > 300 and max(counts) < 500
    assert len(PromptSampler(["only"], seed=0).sample(3)) == 3


def test_sampler_state_round_trip_is_json_able() -> None:
    pool = load_prompts("simple_animals")
    sampler = PromptSampler(pool, seed=7)
    sampler.sample(13)
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = sampler.sample(20)
    resumed = PromptSampler(pool, seed=999)
    resumed.load_state_dict(state)
    assert resumed.sample(20) == expected
    with pytest.raises(ValueError, match="another prompt list"):
        PromptSampler(pool[:-1], seed=7).load_state_dict(state)


def test_eval_prompt_subsets_spread_over_the_set():
    from tdpo.evaluation import parse_prompt_sets, spread

    assert spread(list("abcdefghij"), 3) == ["a", "d", "g"]
    assert spread(list("abc"), 5) == ["a", "b", "c"]
    seen = parse_prompt_sets(["seen=shapes"], 16)["seen"]
    assert len(seen) == 16 and len(set(seen)) == 16
    # The shapes set is sorted by shape: the first 16 are all circles, a spread subset is not.
    assert {s.split()[3] for s in seen} == {"circle", "square", "triangle", "cross"}


def test_a_missing_plugin_is_skipped_and_a_broken_one_surfaces(monkeypatch, tmp_path):
    from tdpo import plugins

    monkeypatch.setattr(plugins, "PLUGINS", ("tdpo_no_such_plugin", "tdpo.no_such_plugin"))
    plugins.load_plugins()
    (tmp_path / "tdpo_broken_plugin.py").write_text("import tdpo_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "PLUGINS", ("tdpo_broken_plugin",))
    with pytest.raises(ModuleNotFoundError, match="tdpo_no_such_dependency"):
        load_prompts("no_such_set")
    (tmp_path / "tdpo_failing_plugin.py").write_text("raise RuntimeError('plugin bug')\n")
    monkeypatch.setattr(plugins, "PLUGINS", ("tdpo_failing_plugin",))
    with pytest.raises(RuntimeError, match="plugin bug"):
        available_prompt_sets()


def test_listing_prompt_sets_and_reward_names_loads_no_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tdpo.prompts import available_prompt_sets, load_prompts\n"
        "from tdpo.rewards.spec import check_factory_modules, parse_reward_spec\n"
        "assert 'shapes' in available_prompt_sets() and load_prompts('shapes_unseen')\n"
        "check_factory_modules('jpeg_compressibility:1,tests.rewards_for_tests:brightness:0.5')\n"
        "assert parse_reward_spec('shapes_gold:2') == [('shapes_gold', 2.0)]\n"
        "heavy = [m for m in ('torch', 'tdpo.world.rewards') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)
