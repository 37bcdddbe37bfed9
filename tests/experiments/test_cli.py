"""Tests for experiments/cli.py (typed overrides, error messages, validation) and
experiments/run_config.py (a run directory's config.json)."""
import json
import textwrap

import ml_collections
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import cli, run_config

CONFIG = textwrap.dedent("""
    import ml_collections
    from ml_collections import config_dict
    from experiments import cli

    def get_config(size="small"):
        c = ml_collections.ConfigDict()
        c.seed = 0
        c.size = size
        c.debug = False
        c.notes = None
        c.optim = ml_collections.ConfigDict(
            {"learning_rate": 1e-3, "betas": (0.9, 0.95), "total_steps": 100})
        c.rl = ml_collections.ConfigDict({"group_size": 4, "levels": [20, 40], "tags": ("a", "b"),
                                          "estimator": "grpo"})
        c.rl.ref_len = config_dict.placeholder(int)
        c.rl.budget = config_dict.placeholder(float)
        c.logging = ml_collections.ConfigDict({"every": 10})
        return c

    def validate(config):
        cli.check(config, "rl.group_size", lambda v: v >= 2,
                  "must be >= 2 for a std-normalised estimator")
        cli.check_choice(config, "rl.estimator", ("grpo", "drgrpo", "rloo"))
""")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "toy.py"
    path.write_text(CONFIG)
    return str(path)


def parse(path, *overrides):
    return cli.parse([f"--config={path}", *overrides])


def test_defaults_and_lock(config_path):
    config = parse(config_path)
    assert (config.seed, config.size, config.optim.betas, config.rl.ref_len) == \
        (0, "small", (0.9, 0.95), None)
    with pytest.raises(AttributeError):
        config.new_key = 1  # locked: no silent additions


@pytest.mark.parametrize("override, key, expected", [
    ("--config.seed=7", "seed", 7),
    ("--config.seed=-1_000", "seed", -1000),
    ("--config.optim.learning_rate=3", "optim.learning_rate", 3.0),
    ("--config.optim.learning_rate=2e-5", "optim.learning_rate", 2e-5),
    ("--config.debug=TRUE", "debug", True),
    ("--config.debug=0", "debug", False),
    ("--config.debug=off", "debug", False),
    ("--config.debug", "debug", True),
    ("--config.size=a b=c", "size", "a b=c"),
    ("--config.optim.betas=(0.8, 1)", "optim.betas", (0.8, 1.0)),
    ("--config.optim.betas=0.5,0.6", "optim.betas", (0.5, 0.6)),
    ("--config.rl.levels=[20, 60, 100]", "rl.levels", [20, 60, 100]),
    ("--config.rl.levels=()", "rl.levels", []),
    ("--config.rl.tags=x,y,z", "rl.tags", ("x", "y", "z")),
    ("--config.rl.tags=('x', \"y z\")", "rl.tags", ("x", "y z")),   # config_flags' form
    ("--config.rl.tags=", "rl.tags", ()),
    ("--config.optim.betas=(inf, 1)", "optim.betas", (float("inf"), 1.0)),
    ("--config.rl.ref_len=512", "rl.ref_len", 512),
    ("--config.rl.budget=0.25", "rl.budget", 0.25),
    ("--config.rl.budget=None", "rl.budget", None),
    ("--config.notes=12", "notes", 12),
    ("--config.notes=hello", "notes", "hello"),
])
def test_typed_overrides(config_path, override, key, expected):
    value = cli.get(parse(config_path, override), key)
    assert value == expected and type(value) is type(expected)


def test_space_separated_forms_and_config_arg(config_path):
    config = cli.parse(["--config", f"{config_path}:large", "--config.seed", "-3",
                        "--config.debug", "--config.rl.group_size", "8"])
    assert (config.size, config.seed, config.debug, config.rl.group_size) == ("large", -3, True, 8)


def test_later_override_wins(config_path):
    assert parse(config_path, "--config.seed=1", "--config.seed=2").seed == 2
    # config_flags alone would join the two values of a tuple field
    assert parse(config_path, "--config.rl.tags=p", "--config.rl.tags=q,r").rl.tags == ("q", "r")


def test_config_flags_sets_the_values(config_path, monkeypatch):
    calls = []
    define = cli.config_flags.DEFINE_config_dict

    def spy(name, config, **kwargs):
        calls.append(list(kwargs["sys_argv"]))
        return define(name, config, **kwargs)

    monkeypatch.setattr(cli.config_flags, "DEFINE_config_dict", spy)
    config = parse(config_path, "--config.seed=7", "--config.rl.tags=x,y", "--config.debug=on",
                   "--config.rl.budget=none", "--config.rl.levels=1,2", "--config.rl.ref_len=9",
                   "--config.notes=12")
    assert (config.seed, config.rl.tags, config.debug, config.rl.budget, config.rl.levels,
            config.rl.ref_len, config.notes) == (7, ("x", "y"), True, None, [1, 2], 9, 12)
    # None, list and untyped None fields are set directly; the rest (placeholders too) by
    # config_flags, once, as typed text
    assert calls == [["chrpo", "--config.seed=7", "--config.rl.tags=('x', 'y')",
                      "--config.debug=true", "--config.rl.ref_len=9"]]


@pytest.mark.parametrize("override", ["--config.seed=-1_000", "--config.optim.betas=(0.8, 1)",
                                      "--config.size=a b=c", "--config.rl.budget=0.25",
                                      "--config.rl.tags=('x', 'z')", "--config.notes=hello"])
def test_parse_and_apply_override_agree(config_path, override):
    key, raw = override[len("--config."):].split("=", 1)
    direct = cli.load_config(config_path)
    cli.apply_override(direct, key, raw)
    assert cli.get(parse(config_path, override), key) == cli.get(direct, key)


@pytest.mark.parametrize("override, message", [
    ("--config.rl.group_sise=3", "unknown config key 'rl.group_sise'; did you mean rl.group_size?"),
    ("--config.optimizer.learning_rate=1", "unknown config key 'optimizer.learning_rate'"),
    ("--config.seed.x=1", "config key 'seed' is a value, not a group"),
    ("--config.optim=1", "config key 'optim' is a group"),
    ("--config.seed=1.5", "config key 'seed': cannot read '1.5' as int"),
    ("--config.seed=ten", "config key 'seed': cannot read 'ten' as int"),
    ("--config.optim.learning_rate=fast",
     "config key 'optim.learning_rate': cannot read 'fast' as float"),
    ("--config.debug=maybe", "config key 'debug': cannot read 'maybe' as bool"),
    ("--config.optim.betas=(0.9,x)", "config key 'optim.betas': cannot read 'x' as float"),
    ("--config.seed=None", "config key 'seed': cannot read 'None' as int"),
    ("--config.rl.ref_len=1.5", "config key 'rl.ref_len': cannot read '1.5' as int"),
    ("--config.rl.group_size=1",
     "config key 'rl.group_size' = 1: must be >= 2 for a std-normalised estimator"),
    ("--config.rl.estimator=ppo",
     "config key 'rl.estimator' = 'ppo': must be one of ('grpo', 'drgrpo', 'rloo')"),
    ("--seed=1", "unrecognised argument '--seed=1'"),
])
def test_errors_name_the_key(config_path, override, message):
    with pytest.raises(cli.ConfigError) as err:
        parse(config_path, override)
    assert message in str(err.value)


def test_missing_or_bad_config_file(tmp_path):
    with pytest.raises(cli.ConfigError, match="no config given"):
        cli.parse([])
    with pytest.raises(cli.ConfigError, match="no such file"):
        cli.parse(["--config=missing/none.py"])
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return {'a': 1}\n")
    with pytest.raises(cli.ConfigError, match=r"not an ml_collections\.ConfigDict"):
        cli.parse([f"--config={bad}"])


def test_default_and_extra_validators(config_path):
    def needs_big(config):
        cli.check_range(config, "optim.total_steps", low=1000)
    with pytest.raises(cli.ConfigError,
                       match=r"'optim.total_steps' = 100: must be a number in \[1000, inf\)"):
        cli.parse([], default=config_path, validators=[needs_big])
    assert cli.parse(["--config.optim.total_steps=5000"], default=config_path,
                     validators=[needs_big]).optim.total_steps == 5000


def test_check_range_open_interval(config_path):
    config = parse(config_path)
    cli.check_range(config, "optim.learning_rate", low=0.0, low_open=True, high=1.0)
    with pytest.raises(cli.ConfigError, match=r"must be a number in \(0.001, 1.0\]"):
        cli.check_range(config, "optim.learning_rate", low=1e-3, low_open=True, high=1.0)


def test_run_prints_error_and_exits(config_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda c: None, argv=[f"--config={config_path}", "--config.sed=1"])
    assert exit_info.value.code == 2
    assert "error: unknown config key 'sed'; did you mean seed?" in capsys.readouterr().err
    assert cli.run(lambda c: c.seed * 2, argv=[f"--config={config_path}", "--config.seed=4"]) == 8


def test_help_lists_keys(config_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(config_path, "--help")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config.rl.group_size=4  (int)" in out and "--config.size=small  (str)" in out


def test_write_run_config_and_resume(config_path, tmp_path):
    run_dir = tmp_path / "run"
    assert not run_config.write_run_config(parse(config_path), run_dir, write=True)
    saved = json.loads((run_dir / run_config.CONFIG_FILE).read_text())
    assert saved["optim"]["betas"] == [0.9, 0.95] and saved["rl"]["ref_len"] is None
    resumable = ("optim.total_steps", "logging.*")
    same = parse(config_path, "--config.optim.total_steps=200", "--config.logging.every=5")
    assert run_config.write_run_config(same, run_dir, resumable=resumable, write=True)
    assert json.loads((run_dir / run_config.CONFIG_FILE).read_text())["optim"]["total_steps"] == 200
    changed = parse(config_path, "--config.seed=3", "--config.optim.betas=(0.9,0.99)")
    with pytest.raises(cli.ConfigError) as err:
        run_config.write_run_config(changed, run_dir, resumable=resumable, write=True)
    assert "optim.betas: [0.9, 0.95] -> [0.9, 0.99]" in str(err.value)
    assert "seed: 0 -> 3" in str(err.value)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(-10**12, 10**12),
       lr=st.floats(allow_nan=False, allow_infinity=False),
       betas=st.lists(st.floats(-1e6, 1e6), max_size=4))
def test_numbers_round_trip_through_text(config_path, seed, lr, betas):
    config = parse(config_path, f"--config.seed={seed}", f"--config.optim.learning_rate={lr!r}",
                   f"--config.optim.betas=({', '.join(map(repr, betas))})")
    assert config.seed == seed and config.optim.learning_rate == lr
    assert config.optim.betas == tuple(betas)


def test_a_key_added_with_its_default_does_not_block_a_resume(tmp_path):
    """A run written before a key existed resumes when the key holds its default; any other
    value of the new key is a change and is refused, naming it."""
    old = ml_collections.ConfigDict({"seed": 0, "rl": {"steps": 10}})
    run_dir = tmp_path / "run"
    run_config.write_run_config(old, run_dir, write=True)
    defaults = ml_collections.ConfigDict({"seed": 0, "rl": {"steps": 10, "budget_mode": "dual"}})
    extended = ml_collections.ConfigDict({"seed": 0, "rl": {"steps": 10, "budget_mode": "dual"}})
    assert run_config.write_run_config(extended, run_dir, write=True, defaults=defaults)
    (run_dir / run_config.CONFIG_FILE).unlink()                             # back to the old file
    run_config.write_run_config(old, run_dir, write=True)
    other = ml_collections.ConfigDict({"seed": 0, "rl": {"steps": 10, "budget_mode": "pid"}})
    with pytest.raises(cli.ConfigError, match=r"rl.budget_mode: <absent> -> \"pid\""):
        run_config.write_run_config(other, run_dir, write=True, defaults=defaults)
    with pytest.raises(cli.ConfigError, match=r"rl.budget_mode: <absent> -> \"dual\""):
        run_config.write_run_config(extended, run_dir, write=True)           # no defaults given
    # nor is it a change the pipeline warns about; another value of it is
    assert run_config.config_changes(extended, run_dir, defaults=defaults) == []
    assert run_config.config_changes(extended, run_dir) == [("rl.budget_mode", "<absent>", '"dual"')]
    assert run_config.config_changes(other, run_dir, defaults=defaults) == [
        ("rl.budget_mode", "<absent>", '"pid"')]
