"""The training and launch configs, shipped inside the package so they are found from any working directory.

`path(name)` gives a config's file (`movekd-hf config-path NAME` prints it), e.g.

    accelerate launch --config_file "$(movekd-hf config-path deepspeed_zero2)" --num_processes 8 \\
        -m movekd_hf.train "$(movekd-hf config-path movekd-v1.1-7b-stage1)"

A source checkout also has them at `configs/` (a link to this folder). See README.md here for what each holds.
The accelerate YAMLs carry their DeepSpeed settings inline (accelerate reads `deepspeed_config_file` as a path or
as a JSON text) and leave `num_processes` to the launcher's `--num_processes`.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
SUFFIXES = (".yaml", ".json", ".md")


def names() -> list[str]:
    """Every config as its path relative to this folder (`train/tiny_stage1.yaml`, ...), sorted."""
    return sorted(
        path.relative_to(ROOT).as_posix()
        for path in ROOT.rglob("*")
        if path.is_file() and path.suffix in SUFFIXES and path.name != "README.md"
    )


def path(name: str) -> Path:
    """The packaged file of config `name`.

    `name` is its path here (`train/tiny_stage1.yaml`), optionally prefixed with `configs/` (as the README and a
    source checkout write it), or a unique file name with or without its suffix (`tiny_stage1`, `zero2.json`).

    Raises FileNotFoundError naming the configs that exist, or the candidates when `name` is ambiguous.
    """
    wanted = name.removeprefix("configs/").strip("/")
    every = names()
    if wanted in every:
        return ROOT / wanted
    matches = [
        candidate
        for candidate in every
        if wanted in (Path(candidate).name, Path(candidate).stem, str(Path(candidate).with_suffix("")))
    ]
    if len(matches) == 1:
        return ROOT / matches[0]
    if matches:
        raise FileNotFoundError(f"config {name!r} is ambiguous: it matches {matches}; give one of them in full")
    raise FileNotFoundError(f"no packaged config {name!r}; expected one of {every}")
