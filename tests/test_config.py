"""msff.config: the typed configs (strict types, one line naming the key) and the shipped configs."""
import dataclasses
import json

import pytest

from msff.config import (
    COMMANDS,
    CONFIG_DIR,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    PredictConfig,
    SplitConfig,
    TrainConfig,
    build_configs,
    check_command_values,
    load_config_file,
    shipped_configs,
)


@pytest.mark.parametrize("values,key,words", [
    ({"epochs": "ten"}, "epochs", "an integer"),
    ({"crop": "64"}, "crop", "an integer or null"),
    ({"batch_size": None}, "batch_size", "an integer"),
    ({"crop": True}, "crop", "an integer or null"),
    ({"lr": float("nan")}, "lr", "a finite number"),
    ({"loss": "focal"}, "loss", "one of 'bce', 'dice', 'bce+dice'"),
    ({"augment": 1}, "augment", "true or false"),
    ({"model_kwargs": [3]}, "model_kwargs", "an object"),
])
def test_train_config_wrong_type_is_one_line_naming_the_key(values, key, words):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(values, source="c.json")
    msg = str(e.value)
    assert "\n" not in msg and f"'{key}'" in msg and words in msg and "c.json" in msg, msg


@pytest.mark.parametrize("values,key", [
    ({"epochs": 0}, "epochs"), ({"crop": 0}, "crop"), ({"lr": 0.0}, "lr"), ({"threshold": 1.5}, "threshold"),
    ({"plateau_factor": 1.0}, "plateau_factor"), ({"device": "gpu"}, "device"), ({"workers": -1}, "workers"),
])
def test_train_config_out_of_range_names_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        TrainConfig(**values)


def test_loss_names_match_the_engine():
    from msff.engine.losses import LOSSES

    hint = [f for f in dataclasses.fields(TrainConfig) if f.name == "loss"][0]
    assert TrainConfig().loss in LOSSES and "Literal['bce', 'dice', 'bce+dice']" in str(hint.type)


def test_engine_reexports_the_one_train_config():
    from msff.engine import TrainConfig as A
    from msff.engine.train import TrainConfig as B

    assert A is B is TrainConfig


def test_command_values_strict_and_unknown_keys():
    check_command_values("train", {"data": ["a"], "val": ["b"], "kernel_size": 3, "bands": [4, 3, 2]})
    for values, key in [({"bands": "4,3,2"}, "bands"), ({"val": "v"}, "val"), ({"mask_color": [1, 2, "3"]}, "mask_color"),
                        ({"val_ratio": "0.2"}, "val_ratio"), ({"runs": 2.5}, "runs")]:
        with pytest.raises(ConfigError, match=f"'{key}'"):
            check_command_values("train", values)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['learning_rate'\]"):
        check_command_values("train", {"learning_rate": 1})
    with pytest.raises(ConfigError, match="tile"):
        build_configs("predict", {"checkpoint": "ck", "tile": 0})
    with pytest.raises(ConfigError, match="mask_color"):
        DataConfig(mask_color=[255, 0])
    with pytest.raises(ConfigError, match="val_ratio"):
        SplitConfig(val_ratio=0.6, test_ratio=0.5)


def test_every_command_field_has_a_help_line():
    import docstring_parser

    for cmd, classes in COMMANDS.items():
        for cls in classes:
            documented = {p.arg_name for p in docstring_parser.parse(cls.__doc__).params}
            missing = {f.name for f in dataclasses.fields(cls)} - documented
            assert not missing, (cmd, cls.__name__, missing)


def test_shipped_training_configs_are_valid():
    names = shipped_configs()
    assert {"realdata-cpu", "demo"} <= set(names)
    for name in names:
        values, path = load_config_file(name)
        cfgs = build_configs("train", dict(values, data=["somewhere"]), source=str(path))
        assert cfgs[TrainConfig].epochs >= 1
    real = build_configs("train", load_config_file("realdata-cpu")[0])
    assert real[TrainConfig].crop == 256 and real[SplitConfig].val_ratio == 0.2


@pytest.mark.parametrize("name", ["cpu", "cpu-long", "paper"])
def test_shipped_experiment_configs_are_valid(name):
    from msff.engine.experiment import load_experiment_config

    cfg = ExperimentConfig.from_file(name)
    TrainConfig.from_dict(cfg.train)
    assert cfg.reference in [m["label"] for m in cfg.models] and len(cfg.seeds) >= 3
    assert cfg.to_dict() == load_experiment_config(name)  # one validation, whoever reads the file


def test_every_shipped_file_is_read_by_a_test():
    names = {p.stem for p in CONFIG_DIR.glob("*.json")}
    assert names == set(shipped_configs()) | {f"experiment_{n}" for n in shipped_configs("experiment_")}


def test_experiment_config_errors_name_the_key(tmp_path):
    base = {"datasets": {"a": "a"}, "models": ["unet"], "seeds": [0]}
    for change, match in [({"seeds": [0, "1"]}, "'seeds'"), ({"bogus": 1}, "bogus"), ({"select": "best"}, "validation split"),
                          ({"reference": "segnet"}, "reference"), ({"train": {"crop": "64"}}, "'crop'"),
                          ({"train": {"seed": 1}}, "seed"), ({"split": {"test_ratio": "0.2"}}, "split.test_ratio"),
                          ({"models": ["no-such-net"]}, "no-such-net"), ({"soil_proxy": {"red": 0}}, "1-based")]:
        with pytest.raises(ValueError, match=match):
            ExperimentConfig.from_dict(dict(base, **change))
    p = tmp_path / "x.yaml"
    p.write_text("datasets: [a]\nmodels: [unet]\nseeds: [0, 1]\ntrain: {crop: 32}\n")
    cfg = ExperimentConfig.from_file(p)
    assert cfg.datasets == {"a": "a"} and cfg.train == {"crop": 32} and "soil_proxy" not in cfg.to_dict()
    with pytest.raises(ConfigError, match="neither a file nor a shipped config"):
        ExperimentConfig.from_file("nosuch")


def test_config_files_json_yaml_and_bad_files(tmp_path):
    (tmp_path / "a.yaml").write_text("epochs: 3\ncrop: 64\n# a comment\n")
    assert load_config_file(tmp_path / "a.yaml")[0] == {"epochs": 3, "crop": 64}
    (tmp_path / "b.json").write_text(json.dumps({"epochs": 3, "description": "x"}))
    assert load_config_file(tmp_path / "b.json")[0] == {"epochs": 3}
    for name, text, match in [("c.json", "{", "not valid JSON"), ("d.yaml", "a: [1,\n", "not valid YAML"),
                              ("e.json", "[1]", "mapping")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=match) as e:
            load_config_file(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)


def test_predict_config_fields_match_run_predict():
    cfg = PredictConfig(checkpoint="ck", inputs=["a.tif"], band_indexes=[4, 3, 2], terrain=["slope"])
    assert cfg.tile == 512 and cfg.overlap == 128 and cfg.engine == "auto"
    with pytest.raises(ConfigError, match="threshold"):
        PredictConfig(checkpoint="ck", threshold=2.0)
