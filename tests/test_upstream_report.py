"""tools/upstream.py: the lock written from a freeze, and `make test-latest`'s report read from a JUnit XML and a
freeze (built here: no network, no pytest run)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import upstream  # noqa: E402

CONSTRAINTS = """\
# The lock
torch==2.14.1
transformers==5.24.0
huggingface_hub==2.4.0
peft==0.21.2
PyYAML==6.0.4
"""

FREEZE = """\
huggingface-hub==2.4.0
nvidia-cublas==13.1.1.3
peft==0.22.0
pyyaml==6.0.4
-e /work/main
torch==2.14.1
transformers==6.0.0
tokenizers @ file:///tmp/tokenizers-0.24.0-cp311-abi3-linux_x86_64.whl
triton==3.8.1
"""

JUNIT = """\
<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="4" time="12.3">
  <testcase classname="tests.test_remote_code" name="test_logits_match[tf-locked]" time="0.1"/>
  <testcase classname="tests.test_remote_code" name="test_gradients_match[tf-latest]" time="0.2">
    <failure message="AssertionError: fc1.lora_A: Tensor-likes are not close!&#10;more">traceback</failure>
  </testcase>
  <testcase classname="tests.test_remote_code" name="test_pipeline_gives_the_same_answer[tf5-oldest]" time="0">
    <error message="failed on setup with &quot;RuntimeError: boom&quot;">traceback</error>
  </testcase>
  <testcase classname="tests.test_remote_code" name="test_logits_match[tf-latest]" time="0">
    <skipped type="pytest.skip" message="the newest transformers is the locked one">skip</skipped>
  </testcase>
</testsuite></testsuites>
"""


def test_parse_pins_reads_freeze_and_constraints_lines():
    pins = upstream.parse_pins(FREEZE + "foo[extra]==1.0 ; python_version < '3.12'  # comment\n")
    assert pins["huggingface-hub"] == ("huggingface-hub", "2.4.0")
    assert pins["tokenizers"][1].startswith("file:///")
    assert pins["foo"] == ("foo", "1.0")
    assert "main" not in pins and "-e" not in str(pins)
    assert upstream.parse_pins(CONSTRAINTS)["pyyaml"] == ("PyYAML", "6.0.4")


def test_lock_leaves_out_the_package_and_the_cuda_wheels():
    freeze = FREEZE + "movekd_hf==0.1.0\ncuda-toolkit==13.0.3.0\n"
    text = upstream.lock_text(freeze)
    lines = text.splitlines()
    assert lines[0].startswith("#")
    assert "transformers==6.0.0" in lines and "torch==2.14.1" in lines
    assert not any(line.startswith(("nvidia-", "cuda-", "triton", "movekd")) for line in lines)
    assert lines[1:] == sorted(lines[1:], key=lambda line: upstream.canonical(line.split("==")[0]))


def test_changes_name_what_moved_against_the_lock():
    found = upstream.changes(FREEZE, CONSTRAINTS, ["transformers>=5.0,<6", "peft>=0.15"])
    by_name = {upstream.canonical(change.name): change for change in found}
    assert set(by_name) == {"transformers", "peft", "tokenizers"}  # hub/PyYAML differ in spelling only
    assert (
        str(by_name["transformers"])
        == "transformers 6.0.0 (locked 5.24.0), outside pyproject.toml's transformers<6,>=5.0"
    )
    assert str(by_name["peft"]) == "peft 0.22.0 (locked 0.21.2)"
    assert str(by_name["tokenizers"]).endswith("(not in the lock)")
    missing = upstream.changes("torch==2.14.1\n", "torch==2.14.1\ntimm==1.0.31\n")
    assert [str(change) for change in missing] == ["timm not installed (locked 1.0.31)"]


def test_junit_results_give_each_outcome_and_first_message_line(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    results = {r.test: r for r in upstream.junit_results(path)}
    assert results["tests.test_remote_code::test_logits_match[tf-locked]"].outcome == "passed"
    failed = results["tests.test_remote_code::test_gradients_match[tf-latest]"]
    assert failed.outcome == "failed" and failed.message == "AssertionError: fc1.lora_A: Tensor-likes are not close!"
    assert results["tests.test_remote_code::test_pipeline_gives_the_same_answer[tf5-oldest]"].outcome == "error"
    assert results["tests.test_remote_code::test_logits_match[tf-latest]"].outcome == "skipped"


def test_report_says_which_versions_moved_and_which_tests_failed(tmp_path, capsys):
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "freeze.txt").write_text(FREEZE)
    (tmp_path / "constraints.txt").write_text(CONSTRAINTS)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["transformers>=5.0,<6"]\n')
    files = {
        option: str(tmp_path / name)
        for option, name in [
            ("--junit", "junit.xml"),
            ("--freeze", "freeze.txt"),
            ("--constraints", "constraints.txt"),
            ("--pyproject", "pyproject.toml"),
        ]
    }
    assert upstream.main(["report", *(item for pair in files.items() for item in pair)]) == 1
    printed = capsys.readouterr().out
    assert "outside pyproject.toml's transformers<6,>=5.0" in printed
    text, passed = upstream.report(
        upstream.changes(FREEZE, CONSTRAINTS), upstream.junit_results(tmp_path / "junit.xml")
    )
    assert not passed
    assert "  transformers 6.0.0 (locked 5.24.0)" in text.splitlines()
    assert "Tests: 1 passed, 1 failed, 1 errors, 1 skipped" in text
    assert "  FAILED tests.test_remote_code::test_gradients_match[tf-latest]: AssertionError:" in text
    last = text.splitlines()[-1]
    assert last.startswith("peft 0.22.0 (locked 0.21.2), ")
    assert "transformers 6.0.0 (locked 5.24.0)" in last
    assert last.endswith(
        ": 2 tests failed: test_gradients_match[tf-latest], test_pipeline_gives_the_same_answer[tf5-oldest]"
    )


def test_report_when_all_pass_or_pytest_did_not_finish():
    text, passed = upstream.report([], [upstream.CaseResult("tests.t::test_a", "passed")])
    assert passed and "none: every package is at its locked version" in text
    assert text.splitlines()[-1] == "the locked versions: all 1 tests passed"
    text, passed = upstream.report([], None)
    assert not passed and "no JUnit XML" in text


def test_lock_command_reads_a_freeze_file(tmp_path, capsys):
    (tmp_path / "freeze.txt").write_text(FREEZE)
    assert upstream.main(["lock", "--freeze", str(tmp_path / "freeze.txt"), "--header", "made here"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [upstream.LOCK_HEADER, "# made here"] and "peft==0.22.0" in out
