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


@pytest.mark.parametrize("text, overrides, expected", [
    ("cluster:\n  engine_cpus: 1\n", [], "1"),
    ("name: t\n", ["cluster.engine_cpus=1"], "1"),
    ("name: t\n", ["cluster.engine_cpus=[0,2]"], "0,2"),
    ("name: t\n", ["cluster.engine_cpus='2-7'"], "2-7"),
    ("name: t\n", [], None),
])
def test_engine_cpus_is_a_cpu_list_however_yaml_reads_it(tmp_path, text, overrides, expected):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    assert load_recipe(p, overrides).cluster.engine_cpus == expected


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("grpo:\n  num_stepz: 5\n", [], "grpo.num_stepz: unknown key; did you mean 'grpo.num_steps'?"),
        ("name: t\n", ["grpo.num_steps=abc"],
         "override 'grpo.num_steps=abc': grpo.num_steps: Input should be a valid integer, unable to parse "
         "string as an integer (got 'abc')"),
        ("name: t\n", ["+grpo.num_stepz=3"], "override '+grpo.num_stepz=3': grpo.num_stepz: unknown key; "
                                              "did you mean 'grpo.num_steps'?"),
        ("name: t\n", ["generation.dynamo.dgd_name=a", "generation.dynamo.frontend_url=http://x"], "not both"),
        ("- a\n- b\n", [], "must be a mapping"),
        ("name: t\n", ["grpo.num_steps"], "must look like section.key=value"),
        ("", [], "is empty; start from examples/grpo_tiny.yaml"),
        ("name: t\n", ["grpoo.num_steps=3"], "override 'grpoo.num_steps=3': grpoo: unknown key; did you mean 'grpo'?"),
        ("name: t\n", ["grpo.num_steps.x=3"], "override 'grpo.num_steps.x=3': grpo.num_steps: Input should be"),
        ("name: t\nstart: 2024-01-01\n", [], "r.yaml: start: Value 'date' is not a supported primitive type; "
                                              "quote the value"),
        ("name: t\ngrpo:\n  num_steps: ${x}\n", [], "r.yaml: grpo.num_steps: Interpolation key 'x' not found"),
        ("name: t\n", ["grpo.num_steps=${nope}"],
         "override 'grpo.num_steps=${nope}': grpo.num_steps: Interpolation key 'nope' not found"),
        ("# only a comment\n", ["grpo.num_steps=3"], "is empty; start from examples/grpo_tiny.yaml"),
        # an unknown --flag passed on as an override (train and k8s run keep unknown options as arguments)
        ("name: t\n", ["--bogus"], "no such option '--bogus' (see the command's --help)"),
        # a union field: one line, its members' tags (literal[...], list[...]) left out
        ("name: t\n", ["cluster.engine=bogus"],
         "override 'cluster.engine=bogus': cluster.engine: Input should be 'dynamo-rl' or 'vllm'; or input should "
         "be a valid list (got 'bogus')"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, text, overrides, expected):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_recipe(p, overrides)
    assert expected in str(e.value)
    assert "literal[" not in str(e.value) and "list[" not in str(e.value)  # pydantic's union tags
    if "unknown key" in expected and not overrides:
        assert str(p) in str(e.value)


def test_a_binary_recipe_is_a_clear_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"name: t\n\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"r.yaml' is not UTF-8 text \(byte 8: invalid start byte\); is it really a YAML"):
        load_recipe(p)


def test_version_names_dynamo_rl_dynamo_and_torch():
    import importlib.metadata as md
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "dynamo_rl.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == (f"dynamo-rl {md.version('dynamo-rl')} (ai-dynamo {md.version('ai-dynamo')}, "
                                f"torch {md.version('torch')})")
