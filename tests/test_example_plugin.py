"""The example third-party plugin, pip-installed into a scratch folder, used through the CLI as a user would."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from safetensors import safe_open

from itmkit.data.shapes import write_shapes

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "itmkit-hello"
RECIPE = EXAMPLE / "recipes" / "hello.toml"
# Small sizes keep the CLI runs quick; the recipe's own sizes are for the built-in dataset.
SMALL = ["--set", "recipe.embed_dim=64", "--set", "text.encoder.word_dim=32"]


@pytest.fixture(scope="session")
def hello_site(tmp_path_factory) -> Path:
    """itmkit-hello installed with pip into its own folder (offline: no index, no build isolation)."""
    source = tmp_path_factory.mktemp("hello-src") / "itmkit-hello"
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources.
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("hello-site")
    if importlib.util.find_spec("setuptools") is None:
        pytest.fail("building the example offline needs setuptools in this environment: pip install setuptools")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
         "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, f"pip could not install the example:\n{result.stderr}"
    return target


@pytest.fixture(scope="session")
def hello_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hello-data")
    write_shapes(folder, seed=0, sizes={"train": 40, "dev": 10, "test": 10})
    return folder


def itmkit(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the itmkit CLI in a fresh interpreter that sees the plugin's folder on its path."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ITMKIT_")}
    environ.update(PYTHONPATH=str(site), COLUMNS="250", **env)
    code = "import sys; from itmkit.cli import run; sys.argv[0] = 'itmkit'; run()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=environ, timeout=120)


def test_the_install_carries_the_entry_point(hello_site):
    (dist,) = hello_site.glob("itmkit_hello-*.dist-info")
    assert "[itmkit]\nhello = itmkit_hello" in (dist / "entry_points.txt").read_text()


def test_itmkit_plugins_lists_hello_with_its_version_and_stage(hello_site):
    result = itmkit(hello_site, "plugins")
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if "itmkit-hello" in line]
    assert "hello" in row and "0.1.0" in row and "hello.gated_mean" in row and "failed" not in row


def test_itmkit_stages_describes_the_plugin_stage(hello_site):
    result = itmkit(hello_site, "stages", "--describe", "hello.gated_mean")
    assert result.returncode == 0, result.stderr
    for text in ("hello.gated_mean  [aggregator]  (hello)", "normalize", "l2-normalise the pooled vector",
                 "example stage; no paper", "consumes: x: LocalPort", "produces: GlobalPort"):
        assert text in result.stdout


def test_a_recipe_builds_with_the_plugin_stage(hello_site, hello_data):
    result = itmkit(hello_site, "build", str(RECIPE), "--data", str(hello_data))
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if "image.pool" in line]
    assert "hello.gated_mean" in row and "Local[1024]" in row and "Global[1024]" in row and "1,025" in row


def test_disabling_the_plugin_makes_its_stage_unknown(hello_site, hello_data):
    result = itmkit(hello_site, "build", str(RECIPE), "--data", str(hello_data), ITMKIT_DISABLE_PLUGINS="hello")
    assert result.returncode == 1
    assert "unknown stage 'hello.gated_mean'" in result.stderr and "image.pool.stage" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_plugin_stage_trains_and_its_weights_are_saved(hello_site, hello_data, tmp_path):
    run = tmp_path / "run"
    trained = itmkit(hello_site, "train", str(RECIPE), "--data", str(hello_data), "--out", str(run), "--device", "cpu",
                     "--set", "train.epochs=1", "--set", "train.batch_size=20", *SMALL)
    assert trained.returncode == 0, trained.stderr
    assert "rSum" in trained.stdout
    # The checkpoint names the plugin's stage in its recipe and holds the gate's weights.
    with safe_open(str(run / "model_best.safetensors"), framework="pt") as f:
        recipe = tomllib.loads(f.metadata()["recipe"])
        assert recipe["image"]["pool"] == {"stage": "hello.gated_mean", "normalize": True}
        assert f.get_tensor("image.pool.gate.weight").shape == (1, 64)
        assert f.get_tensor("image.pool.gate.bias").shape == (1,)


def test_the_plugin_passes_its_own_conformance_tests(hello_site):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ITMKIT_")}
    environ.update(PYTHONPATH=str(hello_site), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        capture_output=True, text=True, env=environ, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    # every conformance check, the registration test and the plugin's own test
    from itmkit.testing import CHECKS

    assert f"{len(CHECKS) + 2} passed" in result.stdout
