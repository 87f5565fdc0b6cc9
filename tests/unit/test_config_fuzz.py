"""Property-based fuzzing of the config parser and overrides: any input either builds a valid
config or raises :class:`tdpo.errors.UsageError`, never another exception."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdpo.config import Config, build_config, iter_fields, parse_override, set_value, validate
from tdpo.errors import UsageError

KEYS = [name for name, *_ in iter_fields()]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=30))
yaml_texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["[1,", "{a: 1", "!!python/object:os.system x", "&a [*a]", "1e999", ".nan", "- -", "~"]
    ),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
)


def _accepts_or_usage_error(fn) -> None:
    try:
        fn()
    except UsageError as exc:
        assert exc.field is not None and str(exc)


@SETTINGS
@given(text=st.text(max_size=60))
def test_parse_override_any_text(text):
    try:
        key, value = parse_override(text)
    except UsageError:
        return
    assert isinstance(key, str)
    assert value is None or isinstance(value, str | int | float | bool | list)


@SETTINGS
@given(key=keys, raw=yaml_texts)
def test_override_text_builds_or_raises_usage_error(key, raw):
    def go():
        k, v = parse_override(f"{key}={raw}")
        config = build_config(overrides={k: v})
        assert isinstance(config, Config)

    _accepts_or_usage_error(go)


@SETTINGS
@given(overrides=st.dictionaries(keys, values, max_size=4))
def test_build_config_any_overrides(overrides):
    _accepts_or_usage_error(lambda: build_config(overrides=overrides))


@SETTINGS
@given(key=keys, value=values)
def test_set_value_then_validate(key, value):
    def go():
        config = Config()
        set_value(config, key, value)
        validate(config)

    _accepts_or_usage_error(go)


@SETTINGS
@given(base=st.dictionaries(st.text(max_size=10), values, max_size=4))
def test_base_mapping_any_shape(base):
    _accepts_or_usage_error(lambda: build_config(base=base))


@SETTINGS
@given(text=yaml_texts)
def test_yaml_config_file_any_text(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text)
    _accepts_or_usage_error(lambda: build_config(config_file=path))
