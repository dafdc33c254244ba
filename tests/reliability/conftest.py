"""Fixtures of the reliability suite (issue 16): a small generated dataset and a finished run."""
from pathlib import Path

import pytest
from rel_helpers import FAST

from msff.data import write_scene_dataset


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> Path:
    """10 synthetic 40×40 RGB scenes with 0/255 masks (images/, masks/)."""
    return write_scene_dataset(tmp_path_factory.mktemp("rel") / "scenes", n=10, size=40, seed=3)


@pytest.fixture(scope="session")
def finished_run(scenes, tmp_path_factory) -> Path:
    """A complete one-epoch run folder (best/, metrics.json, log.csv, …), built once; tests copy it."""
    from msff.cli import main

    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", str(scenes), "--out", str(run), *FAST]) == 0
    return run
