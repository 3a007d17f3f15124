import pytest

from qtool.errors import ConfigError
from qtool.recipe import Recipe, check, fingerprint, load_recipe, to_yaml

RECIPES = sorted((__import__("pathlib").Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_defaults_and_overrides():
    r = load_recipe([], ["quant.group_size=64", "passes.awq.grid=10", "model.path=x"])
    assert isinstance(r, Recipe)
    assert r.quant.group_size == 64 and r.model.path == "x"
    assert r.passes.awq is not None and r.passes.awq.grid == 10 and r.passes.awq.clip is True
    assert r.passes.smoothquant is None


def test_yaml_files_merge_in_order(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("quant:\n  w_bits: 3\n  group_size: 32\n")
    b.write_text("quant:\n  group_size: 64\n")
    r = load_recipe([a, b], [])
    assert (r.quant.w_bits, r.quant.group_size) == (3, 64)
    r = load_recipe([a, b], ["quant.group_size=128"])
    assert r.quant.group_size == 128


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("quant.gruop_size=64", "did you mean 'quant.group_size'"),
        ("passes.awq.gird=3", "did you mean 'passes.awq.grid'"),
        ("calib.n_sample=3", "did you mean 'calib.n_samples'"),
        ("layuot=w8a8", "did you mean 'layout'"),
    ],
)
def test_unknown_key_names_nearest(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_recipe([], [override])
    assert "unknown recipe key" in str(e.value) and fragment in str(e.value)
    assert e.value.exit_code == 3


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("quant:\n  w_bitz: 4\n")
    with pytest.raises(ConfigError, match=r"quant.w_bitz.*did you mean 'quant.w_bits'"):
        load_recipe([f], [])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["quant.w_bits=notanint"], "invalid value for 'quant.w_bits'"),
        (["quant.group_size=48"], "group_size=48"),
        (["quant.w_bits=9"], "w_bits=9"),
        (["layout=quick-w4a16", "quant.w_bits=3"], "quick-w4a16 needs"),
        (["layout=w8a8"], "w8a8 needs"),
        (["passes.smoothquant.alpha=0.5"], "smoothquant needs quant.a_bits=8"),
        (["passes.smooth_attention.alpha=0.5"], "smooth_attention needs quant.kv_bits"),
        (["quant.scheme=magic"], "quant.scheme='magic'"),
        (["quant.a_static=true"], "a_static=true needs"),
        (["layout=nope"], "layout 'nope' is unknown"),
        (["novalue"], "not of the form key=value"),
    ],
)
def test_invalid_values(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_recipe([], overrides)
    assert fragment in str(e.value)


def test_all_problems_reported_at_once():
    r = Recipe()
    r.quant.w_bits = 12
    r.quant.group_size = 7
    r.quant.a_bits = 5
    problems = check(r)
    assert len(problems) >= 3


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe([tmp_path / "missing.yaml"], [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_recipe([bad], [])


def test_fingerprint_ignores_output_dir_but_not_quant():
    a = load_recipe([], ["output.dir=/x"])
    b = load_recipe([], ["output.dir=/y"])
    c = load_recipe([], ["quant.group_size=64"])
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_yaml_round_trip(tmp_path):
    r = load_recipe([], ["passes.awq.grid=7", "quant.group_size=32"])
    f = tmp_path / "resolved.yaml"
    f.write_text(to_yaml(r))
    assert load_recipe([f], []) == r


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    load_recipe([path], [])
