"""The configs ship in the wheel and are found from any folder; accelerate configs leave `num_processes` to the
launcher and carry their DeepSpeed settings inline, so they work outside a source checkout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from movekd_hf import configs
from movekd_hf.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO), "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return next(out.glob("movekd_hf-*.whl"))


def test_wheel_holds_every_config_and_finds_it_from_another_folder(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        packed = {name.removeprefix("movekd_hf/configs/") for name in archive.namelist() if "/configs/" in name}
        archive.extractall(tmp_path / "site")
    assert set(configs.names()) <= packed and "README.md" in packed
    code = """
import json, sys
sys.path.insert(0, sys.argv[1])
from movekd_hf import configs
print(json.dumps({"file": configs.__file__, "paths": {name: str(configs.path(name)) for name in configs.names()}}))
"""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], cwd=elsewhere, check=True,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["file"].startswith(str(tmp_path / "site"))  # the wheel's copy, not the source tree
    assert sorted(found["paths"]) == configs.names()
    for name, path in found["paths"].items():
        assert Path(path).read_bytes() == (REPO / "movekd_hf" / "configs" / name).read_bytes(), name


def test_config_path_command_and_names(capsys):
    assert main(["config-path", "tiny_stage1"]) == 0
    assert Path(capsys.readouterr().out.strip()) == configs.ROOT / "train" / "tiny_stage1.yaml"
    assert (
        configs.path("configs/deepspeed/zero2.json") == configs.path("zero2") == configs.ROOT / "deepspeed/zero2.json"
    )
    assert main(["config-path", "nope"]) == 2
    assert "no packaged config 'nope'; expected one of" in capsys.readouterr().err
    assert main(["config-path"]) == 0 and "accelerate/deepspeed_zero2.yaml" in capsys.readouterr().out


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_launch_configs_carry_their_settings_inline(stage, tmp_path, monkeypatch):
    """accelerate reads `deepspeed_config_file` as a path or a JSON text; inline, it needs no working directory."""
    from accelerate.utils import DeepSpeedPlugin

    launch = yaml.safe_load(configs.path(f"accelerate/deepspeed_zero{stage}.yaml").read_text())
    inline = launch["deepspeed_config"]["deepspeed_config_file"]
    assert json.loads(inline) == json.loads(configs.path(f"deepspeed/zero{stage}.json").read_text())
    monkeypatch.chdir(tmp_path)
    plugin = DeepSpeedPlugin(hf_ds_config=inline)
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("name", ["multi_gpu", "deepspeed_zero2", "deepspeed_zero3"])
def test_num_processes_comes_from_the_launcher(name, tmp_path, monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.chdir(tmp_path)
    parser = launch_command_parser()
    config = str(configs.path(f"accelerate/{name}.yaml"))
    args = _validate_launch_command(parser.parse_args(["--config_file", config, "--num_processes", "3", "x.py"]))[0]
    assert args.num_processes == 3
    with pytest.raises(ValueError, match="manually pass in `--num_processes`"):
        _validate_launch_command(parser.parse_args(["--config_file", config, "x.py"]))


def test_configs_named_in_the_docs_exist():
    for doc in (REPO / "README.md", configs.ROOT / "README.md", REPO / "Makefile"):
        for name in re.findall(r"configs/([\w./-]+\.(?:yaml|json))", doc.read_text()):
            assert (REPO / "configs" / name).is_file() and configs.path(name).is_file(), f"{doc.name}: {name}"
