"""Property tests: any recipe dictionary, --set value or bit string is a valid recipe or one clear error."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitq.bits import Bits
from vitq.errors import ConfigError
from vitq.recipes import Recipe, list_recipes, load_recipe, parse_assignments, set_pass_options

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["W", "A", "uniform", "log2", "tensor", "channel", "minmax",
                                                           "calibrate", "reparam", "reconstruct", "act:*", "weight:*"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8) | st.sampled_from(
                                                           ["quantizer", "bits", "granularity", "observer", "pass",
                                                            "iters", "pattern", "rule", "kind", "symmetric"]),
                                                           inner, max_size=4)), max_leaves=12)
rule = st.fixed_dictionaries({}, optional={"quantizer": scalars, "bits": scalars, "granularity": scalars,
                                           "observer": scalars, "symmetric": scalars, "percentile": scalars,
                                           "options": values})
recipe_dicts = st.fixed_dictionaries({}, optional={
    "name": scalars, "calib_size": scalars, "description": scalars, "full_quant": scalars, "softmax": scalars,
    "rules": st.one_of(values, st.dictionaries(st.sampled_from(["act:*", "weight:*", "act:QKV_IN", "act:NOPE", "x"]),
                                               st.one_of(st.none(), rule, values), max_size=3)),
    "passes": st.one_of(values, st.lists(st.fixed_dictionaries({"pass": st.sampled_from(
        ["calibrate", "reparam", "nope", "reconstruct"])}, optional={"iters": scalars, "target": scalars,
                                                                     "max_elements": scalars}), max_size=3)),
    "overrides": values, "extends": st.one_of(scalars, st.lists(st.sampled_from(["minmax", "repq", "nope"]), max_size=2)),
    "bogus": scalars})


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(recipe_dicts)
def test_any_recipe_dict_is_a_recipe_or_one_clear_error(d: dict) -> None:
    try:
        r = Recipe.from_dict(d, "fuzz.yaml")
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg.strip()
        return
    assert Recipe.from_dict(r.to_dict()) == r  # what loads round-trips


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(["iters", "max_elements", "target", "lr_round", "loss", "slicing", "p",
                                        "batch_size", "nope"]), scalars, min_size=1, max_size=3),
       st.sampled_from(sorted(list_recipes())))
def test_any_set_value_is_applied_or_refused(values: dict, recipe: str) -> None:
    try:
        set_pass_options(load_recipe(recipe), values)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e).strip()


@settings(derandomize=True)
@given(st.text(max_size=10))
def test_any_bit_string(text: str) -> None:
    try:
        b = Bits.parse(text)
    except ConfigError:
        return
    assert 2 <= b.w <= 8 and 2 <= b.a <= 8 and Bits.parse(str(b)) == b


@settings(derandomize=True)
@given(st.lists(st.text(max_size=15), max_size=3))
def test_any_set_assignment_text(items: list) -> None:
    try:
        parse_assignments(items)
    except ConfigError as e:
        assert "--set" in str(e)


@pytest.mark.parametrize("text", ["iters=5", "loss=fisher_diag", "candidates=[half, block]", "clip_mad_k=null"])
def test_set_assignments_parse(text: str) -> None:
    assert len(parse_assignments([text])) == 1


@pytest.mark.parametrize("files, pattern", [
    ({"a": "extends: {dir}/a.yaml\n"}, r"extends forms a cycle \(a -> a\)"),
    ({"a": "extends: {dir}/b.yaml\n", "b": "extends: [minmax, {dir}/a.yaml]\n"}, r"cycle \(a -> b -> a\)"),
    ({"a": "calib_size: many\n"}, "calib_size must be a whole number of images >= 1, got 'many'"),
    ({"a": "passes: 5\n"}, "passes must be a list of '- pass: NAME' entries, got 5"),
    ({"a": "rules:\n  'act:*': {quantizer: uniform, bits: true}\n"}, r"a.yaml rule act:\*: bits must be 'W', 'A' or an integer, got True"),
    ({"a": "rules:\n  'act:*': {quantizer: uniform, bits: 1}\n"}, r"a.yaml rule act:\*: bit-width 1 is out of range"),
    ({"a": "rules: [1, 2]\n"}, "rules must be a mapping"),
    ({"a": "rules:\n  'act:*': {quantizer: uniform, options: [null]}\n"}, "options must be a mapping"),
])
def test_bad_recipe_files(tmp_path, files: dict, pattern: str) -> None:
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text.replace("{dir}", str(tmp_path)))
    with pytest.raises(ConfigError, match=pattern):
        load_recipe(str(tmp_path / "a.yaml"))
