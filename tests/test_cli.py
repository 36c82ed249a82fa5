"""The `movekd-hf` command as a user meets it: `--version`, help text on every option, a `--help` that imports
neither torch nor transformers, and user errors that end in one line naming the problem, exit code 2 (the
traceback only with `--debug`). Errors are checked through the installed script (a real subprocess) where the
process boundary matters, through `cli.main` otherwise."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from _distill_fixtures import tiny_spec

from movekd_hf import cli

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "movekd-hf"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_script(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, timeout=timeout, env=OFFLINE)


def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    """`cli.main(argv)` -> (exit code, stderr lines); argparse's own exits count as exit codes."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.splitlines()


def assert_one_line_error(code: int, lines: list[str], command: str, *fragments: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"movekd-hf {command}: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------- version, help


def test_version_is_the_installed_distributions():
    out = run_script("--version")
    assert out.returncode == 0, out.stderr
    installed = importlib.metadata.version("movekd_hf")
    assert out.stdout.startswith(f"movekd-hf {installed}"), out.stdout


def test_source_version_matches_pyproject():
    import re

    import movekd_hf

    # pyproject.toml's static `version = "..."` (tomllib is Python 3.11+; the package supports 3.10).
    version = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert version is not None and movekd_hf.__version__ == version.group(1)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Options and positionals of `parser` with no help text (argparse's own -h/--help excluded)."""
    return [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
        and (action.help is None or not action.help.strip())
    ]


SUBCOMMANDS = sorted(_subcommands(cli.build_parser()))


def test_the_top_level_parser_documents_every_option_and_subcommand():
    parser = cli.build_parser()
    assert _undocumented(parser) == []
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert [choice.dest for choice in action._choices_actions if not choice.help] == []


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_of_every_subcommand_has_help(command):
    # One case per subcommand, so a missing description names its command (and the file that owns it).
    subparser = _subcommands(cli.build_parser())[command]
    assert _undocumented(subparser) == [], f"`movekd-hf {command}`: options without help text"


def test_choices_are_the_packages_and_listed_in_help():
    from movekd_hf.distill.presets import TEACHER_SETS
    from movekd_hf.models import PRESETS

    commands = _subcommands(cli.build_parser())

    def option(command: str, name: str) -> argparse.Action:
        return next(a for a in commands[command]._actions if name in a.option_strings)

    assert tuple(option("plan", "--preset").choices) == PRESETS
    assert tuple(option("init", "--preset").choices) == PRESETS
    assert set(option("plan", "--teachers").choices) == set(TEACHER_SETS)
    assert set(option("cache-teachers", "--teacher-set").choices) == set(TEACHER_SETS)
    plan_help = commands["plan"].format_help()
    assert all(name in plan_help for name in (*PRESETS, *TEACHER_SETS)), plan_help


def _heavy_modules_after(code: str) -> list[str]:
    probe = code + "\nprint('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=OFFLINE)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.rsplit("HEAVY", 1)[1].strip().replace("'", '"'))


def test_help_of_every_subcommand_and_version_stay_light():
    # `train --help` is the exception: it prints the training arguments, which are transformers' TrainingArguments.
    light = [command for command in SUBCOMMANDS if command != "train"]
    code = (
        "import sys, contextlib, io\n"
        "from movekd_hf import cli\n"
        f"for argv in [['--help'], ['--version']] + [[c, '--help'] for c in {light!r}]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n            cli.main(argv)\n        except SystemExit:\n            pass\n"
    )
    assert _heavy_modules_after(code) == []


def test_scorers_import_stays_light():
    # Scorers need only the standard library (evaluation/__init__.py says so); `movekd-hf score` relies on it.
    assert _heavy_modules_after("import sys, movekd_hf.evaluation.scorers") == []


# ------------------------------------------------------------------------------------------------------- errors


def test_unknown_preset_is_one_line_through_the_installed_script():
    out = run_script("plan", "--preset", "gpt-5")
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert_one_line_error(2, lines, "plan", "--preset", "'gpt-5'", "llava-1.5-7b")


def test_python_dash_m_train_is_one_line_too(tmp_path):
    """`python -m movekd_hf.train` (what `accelerate launch -m` runs) reports a user error as `movekd-hf train`."""
    command = [sys.executable, "-m", "movekd_hf.train", str(tmp_path / "missing.yaml")]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, env=OFFLINE)
    assert_one_line_error(out.returncode, out.stderr.splitlines(), "train", "missing.yaml", "no such file")
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, timeout=120, env=OFFLINE)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_offline_hub_id_is_one_line_and_debug_shows_the_traceback(tmp_path):
    argv = ["init", "--llava", "nobody/no-such-llava", "--out", str(tmp_path / "out")]
    out = run_script(*argv)
    assert_one_line_error(out.returncode, out.stderr.splitlines(), "init", "--llava", "nobody/no-such-llava")
    assert "HF_HUB_OFFLINE" in out.stderr
    debug = run_script(*argv, "--debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "InputError" in debug.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["plan", "--preset", "tiny", "--teachers", "v2"], ["--teachers", "'v2'", "v1.1"]),
        (["init", "--preset", "gpt", "--out", "OUT"], ["--preset", "'gpt'", "tiny"]),
        (["init", "--preset", "llava-1.5-7b", "--out", "OUT"], ["--preset", "pretrained weights", "--vision"]),
        (["init", "--vision", "openai/clip", "--out", "OUT"], ["--vision needs --llm"]),
        (["init", "--out", "OUT"], ["no model source", "--preset, --llava"]),
        (["init", "--llava", "MISSING/ckpt/folder", "--out", "OUT"], ["--llava", "no such file or folder"]),
        (["init", "--preset", "tiny", "--num-experts", "0", "--out", "OUT"], ["--num-experts", ">= 1"]),
        (["init", "--preset", "tiny", "--lora-alpha", "nan", "--out", "OUT"], ["--lora-alpha", "> 0"]),
        (["cache-teachers", "--estimate", "--teacher-set", "v3"], ["--teacher-set", "'v3'", "tiny"]),
        (["cache-teachers", "--teacher-set", "tiny"], ["--data-path and --cache-dir not given"]),
        (["cache-teachers", "--data-path", "MISSING.json", "--cache-dir", "C"], ["--data-path", "does not exist"]),
        (["cache-teachers", "--estimate", "--teachers-json", "MISSING.json"], ["--teachers-json", "does not exist"]),
        (["cache-teachers", "--estimate", "--teacher-set", "tiny", "--compress", "sam"], ["--compress", "SLUG=VALUE"]),
        (["cache-teachers", "--estimate", "--teacher-set", "tiny", "--compress", "sam=x"], ["--compress", ">= 1"]),
        (["cache-teachers", "--estimate", "--teacher-set", "tiny", "--checkpoint", "eva=w.pth"], ["['eva']"]),
        (["cache-teachers", "--estimate", "--student-grid", "big"], ["--student-grid", "HxW"]),
        (["cache-teachers", "--estimate", "--background", "1,2"], ["--background", "R,G,B"]),
        (["cache-teachers", "--estimate", "--model", "MISSING/ckpt/folder"], ["--model", "no such file or folder"]),
    ],
)
def test_user_errors_end_in_one_line_with_exit_2(argv, fragments, tmp_path, capsys):
    argv = [str(tmp_path / a) if a.startswith("MISSING") or a == "OUT" else a for a in argv]
    assert_one_line_error(*run_main(argv, capsys), argv[0], *fragments)


def test_debug_reraises_instead(tmp_path):
    from movekd_hf.errors import InputError

    with pytest.raises(InputError, match="no such file or folder"):
        cli.main(["--debug", "init", "--llava", str(tmp_path / "missing" / "x"), "--out", str(tmp_path / "out")])


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"")
    code, lines = run_main(["init", "--preset", "tiny", "--out", str(out)], capsys)
    assert_one_line_error(code, lines, "init", str(out), "--out", "is a file")


def test_image_folder_that_does_not_exist(tmp_path, capsys):
    from movekd_hf.training.toy_data import make_toy_llava_dataset

    paths = make_toy_llava_dataset(tmp_path / "toy", num_samples=1)
    argv = ["cache-teachers", "--data-path", str(paths.pretrain_json), "--cache-dir", str(tmp_path / "cache")]
    code, lines = run_main([*argv, "--image-folder", str(tmp_path / "no-images")], capsys)
    assert_one_line_error(code, lines, "cache-teachers", "--image-folder", "no-images", "does not exist")


def test_teachers_json_faults_name_file_and_entry(tmp_path, capsys):
    specs = tmp_path / "teachers.json"
    argv = ["cache-teachers", "--estimate", "--teachers-json", str(specs), "--student-grid", "4"]
    specs.write_text('[\n{"slug": "clip",\n')
    assert_one_line_error(*run_main(argv, capsys), "cache-teachers", f"{specs}:3", "not valid JSON")
    specs.write_text(json.dumps([asdict(tiny_spec("clip")), {**asdict(tiny_spec("sam")), "colour": "red"}]))
    assert_one_line_error(*run_main(argv, capsys), "cache-teachers", str(specs), "entry 1 (sam)", "colour")
    specs.write_text(json.dumps([{**asdict(tiny_spec("clip")), "resize_mode": "stretch"}]))
    assert_one_line_error(*run_main(argv, capsys), "cache-teachers", "entry 0 (clip)", "resize_mode", "stretch")


def test_a_feature_layer_the_teacher_lacks_is_one_line_before_any_work(tmp_path, capsys):
    # Today's failure was an IndexError in the first forward, after the dataset was read; now the build refuses.
    from movekd_hf.training.toy_data import make_toy_llava_dataset

    paths = make_toy_llava_dataset(tmp_path / "toy", num_samples=2)
    specs = tmp_path / "teachers.json"
    specs.write_text(json.dumps([asdict(tiny_spec("clip", feature_layer=9))]))
    argv = ["cache-teachers", "--data-path", str(paths.pretrain_json), "--image-folder", str(paths.image_folder)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--teachers-json", str(specs), "--student-grid", "4"]
    code, lines = run_main([*argv, "--no-progress"], capsys)
    assert_one_line_error(code, lines, "cache-teachers", "'clip'", "feature_layer 9", "-4..3")
    assert not any((tmp_path / "cache").glob("*/*.arrow"))


def test_paper_teachers_offline_name_the_teacher_and_its_id(tmp_path, capsys):
    from movekd_hf.distill.presets import CLIP_L_336_ID
    from movekd_hf.training.toy_data import make_toy_llava_dataset

    paths = make_toy_llava_dataset(tmp_path / "toy", num_samples=1)
    argv = ["cache-teachers", "--data-path", str(paths.pretrain_json), "--image-folder", str(paths.image_folder)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--teacher-set", "v1.0", "--no-progress"]
    code, lines = run_main(argv, capsys)
    assert_one_line_error(code, lines, "cache-teachers", "teacher clip", CLIP_L_336_ID, "HF_HUB_OFFLINE=1")


def test_a_checkpoint_with_a_bad_saved_setting_is_one_line(tiny_checkpoint, tmp_path, capsys):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 7}))
    code, lines = run_main(["cache-teachers", "--estimate", "--model", str(folder), "--teacher-set", "tiny"], capsys)
    assert_one_line_error(code, lines, "cache-teachers", "--model", str(folder), "num_experts_per_tok")


EXIT_SCRIPT = """
import atexit, logging, logging.handlers, sys
from movekd_hf import cli
target = logging.FileHandler(sys.argv[2])
logging.getLogger().addHandler(logging.handlers.MemoryHandler(capacity=100, target=target))  # flushed when closed
logging.getLogger().warning("saved checkpoint-4")
atexit.register(lambda: print(" teardown ran"))
print("last line", end="")
if sys.argv[1] == "distributed":
    cli.skip_interpreter_teardown()
cli.exit_process(3)
"""


@pytest.mark.parametrize("run", ["distributed", "one process"])
def test_exit_process_skips_teardown_only_after_a_distributed_run_and_loses_no_output(run, tmp_path):
    log = tmp_path / "run.log"
    result = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, run, str(log)], capture_output=True, text=True)
    assert result.returncode == 3 and result.stderr == ""
    # stdout is a pipe (block-buffered) and the log record sits in a buffering handler: both still arrive.
    assert result.stdout.startswith("last line") and "saved checkpoint-4" in log.read_text()
    assert ("teardown ran" in result.stdout) is (run == "one process")


def test_end_distributed_destroys_the_group_and_marks_the_teardown_to_skip(tmp_path, monkeypatch):
    import torch.distributed as dist

    from movekd_hf.train import end_distributed

    monkeypatch.setattr(cli, "_skip_teardown", False)
    end_distributed()  # no process group: nothing to do
    assert cli._skip_teardown is False
    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    end_distributed()
    assert not dist.is_initialized() and cli._skip_teardown is True


def test_console_script_ends_through_exit_process():
    assert "from movekd_hf.cli import console_main" in SCRIPT.read_text()  # the script pip wrote from pyproject
    assert run_script("--version").returncode == 0


def test_exit_process_keeps_its_code_without_a_stdout():
    script = "import sys\nfrom movekd_hf import cli\nsys.stdout = None\ncli.skip_interpreter_teardown()\ncli.exit_process(5)\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 5 and result.stderr == ""
