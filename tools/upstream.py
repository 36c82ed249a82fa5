"""The lock (constraints.txt) and what upstream releases do to it.

    pip freeze --all --exclude-editable | python tools/upstream.py lock > constraints.txt
    python tools/upstream.py report --constraints constraints.txt --freeze freeze.txt --junit junit.xml

`lock` turns a `pip freeze` into the lock: the package itself and torch's Linux-only CUDA wheels (which torch
pins itself) are left out. `report` (what `make test-latest` prints) lists every package whose installed version
differs from the lock, and the tests that failed, read from pytest's JUnit XML (`--junitxml`), ending with one
line such as `transformers 5.25.0 (locked 5.24.0): 2 tests failed: ...`. Standard library only (plus
`packaging`, when present, to say which versions fall outside pyproject.toml's ranges).
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

# Never in the lock: this package (installed editable) and torch's CUDA wheels, which exist on Linux only and
# whose versions torch's own requirements fix.
UNLOCKED = re.compile(r"^(movekd-hf|nvidia-.*|cuda-.*|triton)$")
LOCK_HEADER = "# The lock: what `make test` installed and passed with (`make lock` rewrites it from .venv)."


def canonical(name: str) -> str:
    """PEP 503 name: `Foo_Bar.baz` -> `foo-bar-baz`."""
    return re.sub(r"[-_.]+", "-", name).strip().lower()


def parse_pins(text: str) -> dict[str, tuple[str, str]]:
    """`name==version` lines of a freeze or constraints file -> {canonical name: (name as written, version)}.

    Comments, options, editable installs and markers are skipped or dropped; `name @ url` keeps the URL as its
    version, so a direct reference still shows up as different from a pinned release.
    """
    pins = {}
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        line = line.split(";", 1)[0].strip()
        if "==" in line:
            name, version = (part.strip() for part in line.split("==", 1))
        elif " @ " in line:
            name, version = (part.strip() for part in line.split(" @ ", 1))
        else:
            continue
        name = name.split("[", 1)[0]
        pins[canonical(name)] = (name, version)
    return pins


def lock_text(freeze: str, header: str = LOCK_HEADER) -> str:
    """The constraints file for a `pip freeze --all --exclude-editable` output."""
    lines = [header]
    for key, (name, version) in sorted(parse_pins(freeze).items()):
        if not UNLOCKED.match(key):
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


@dataclass
class Change:
    name: str
    installed: str | None  # None: locked but not installed
    locked: str | None  # None: installed but not in the lock
    outside: str | None = None  # the pyproject.toml requirement this version falls outside, if any

    def __str__(self) -> str:
        if self.locked is None:
            text = f"{self.name} {self.installed} (not in the lock)"
        elif self.installed is None:
            text = f"{self.name} not installed (locked {self.locked})"
        else:
            text = f"{self.name} {self.installed} (locked {self.locked})"
        return text + (f", outside pyproject.toml's {self.outside}" if self.outside else "")


def changes(freeze: str, constraints: str, requirements: list[str] = ()) -> list[Change]:
    """Packages whose installed version differs from the lock (leaving out what the lock never holds)."""
    installed, locked = parse_pins(freeze), parse_pins(constraints)
    ranges = _ranges(requirements)
    found = []
    for key in sorted(set(installed) | set(locked)):
        if UNLOCKED.match(key):
            continue
        have, want = installed.get(key), locked.get(key)
        if have is not None and want is not None and have[1] == want[1]:
            continue
        name = (have or want)[0]
        change = Change(name, have and have[1], want and want[1])
        requirement = ranges.get(key)
        if requirement is not None and change.installed is not None and not _satisfies(requirement, change.installed):
            change.outside = str(requirement)
        found.append(change)
    return found


def _ranges(requirements) -> dict:
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return {}
    parsed = {}
    for text in requirements:
        requirement = Requirement(text)
        if requirement.specifier:
            parsed[canonical(requirement.name)] = requirement
    return parsed


def _satisfies(requirement, version: str) -> bool:
    try:
        return requirement.specifier.contains(version, prereleases=True)
    except Exception:  # a URL or another non-version: nothing to compare
        return True


def pyproject_requirements(path: Path) -> list[str]:
    """The `[project] dependencies` of a pyproject.toml (empty without tomllib, i.e. on Python 3.10)."""
    try:
        import tomllib
    except ImportError:
        return []
    with open(path, "rb") as file:
        return tomllib.load(file).get("project", {}).get("dependencies", [])


@dataclass
class CaseResult:
    test: str  # module::name, e.g. tests.test_remote_code::test_logits_match[tf-locked]
    outcome: str  # passed, failed, error or skipped
    message: str = ""


def junit_results(path: Path) -> list[CaseResult]:
    """Every test case of a pytest JUnit XML file with its outcome and the first line of its message."""
    results = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "").strip().splitlines()
                message = message[0][:200] if message else ""
                if outcome != "skipped":
                    break
        results.append(CaseResult(test, outcome, message))
    return results


def report(found: list[Change], results: list[CaseResult] | None) -> tuple[str, bool]:
    """The text `make test-latest` prints, and whether everything passed."""
    lines = ["Upstream versions that differ from the lock (constraints.txt):"]
    lines += [f"  {change}" for change in found] or ["  none: every package is at its locked version"]
    if results is None:
        lines += ["Tests: no JUnit XML (pytest did not run to the end)"]
        return "\n".join(lines), False
    counts = {outcome: sum(r.outcome == outcome for r in results) for outcome in ("passed", "failed", "error")}
    skipped = sum(r.outcome == "skipped" for r in results)
    lines.append(
        f"Tests: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, {skipped} skipped"
    )
    broken = [r for r in results if r.outcome in ("failed", "error")]
    for result in broken:
        lines.append(f"  {result.outcome.upper()} {result.test}" + (f": {result.message}" if result.message else ""))
    moved = ", ".join(str(change) for change in found if change.installed is not None) or "the locked versions"
    if broken:
        names = ", ".join(result.test.rsplit("::", 1)[-1] for result in broken)
        lines.append(f"{moved}: {len(broken)} test{'s' if len(broken) > 1 else ''} failed: {names}")
    else:
        lines.append(f"{moved}: all {counts['passed']} tests passed")
    return "\n".join(lines), not broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    lock = commands.add_parser("lock", help="a pip freeze (stdin or --freeze) -> the lock, on stdout")
    lock.add_argument("--freeze", type=Path, help="a `pip freeze --all --exclude-editable` output (default: stdin)")
    lock.add_argument("--header", action="append", default=[], help="an extra comment line for the top")
    check = commands.add_parser("report", help="what moved against the lock, and which tests failed")
    check.add_argument("--constraints", type=Path, default=Path("constraints.txt"))
    check.add_argument("--freeze", type=Path, required=True, help="`pip freeze --all` of the environment tested")
    check.add_argument("--junit", type=Path, required=True, help="pytest's --junitxml output")
    check.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)

    if args.command == "lock":
        freeze = args.freeze.read_text() if args.freeze else sys.stdin.read()
        header = "\n".join([LOCK_HEADER, *(f"# {line}" for line in args.header)])
        sys.stdout.write(lock_text(freeze, header))
        return 0
    requirements = pyproject_requirements(args.pyproject) if args.pyproject.exists() else []
    found = changes(args.freeze.read_text(), args.constraints.read_text(), requirements)
    results = junit_results(args.junit) if args.junit.exists() else None
    text, passed = report(found, results)
    print(text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
