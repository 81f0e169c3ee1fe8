import pytest

from dynamo_rl.config import ConfigError, load_recipe


def test_overrides_and_plus_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("grpo:\n  num_steps: 5\n")
    cfg = load_recipe(p, ["grpo.num_steps=20", "+generation.dynamo.dgd_name=my-dgd", "grpo.clip_eps=0.1"])
    assert cfg.grpo.num_steps == 20
    assert cfg.grpo.clip_eps == 0.1
    assert cfg.generation.dynamo.dgd_name == "my-dgd"
    assert cfg.generation.dynamo.is_remote


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("grpo:\n  num_stepz: 5\n", [], "grpo.num_stepz: unknown key; did you mean 'grpo.num_steps'?"),
        ("", ["grpo.num_steps=abc"], "grpo.num_steps: Input should be a valid integer"),
        ("", ["generation.dynamo.dgd_name=a", "generation.dynamo.frontend_url=http://x"], "not both"),
        ("- a\n- b\n", [], "must be a mapping"),
        ("", ["grpo.num_steps"], "must look like section.key=value"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, text, overrides, expected):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_recipe(p, overrides)
    assert expected in str(e.value)
    if "unknown key" in expected:
        assert str(p) in str(e.value)
