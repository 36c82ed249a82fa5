"""A teacher's Hub revision (`TeacherSpec.revision`, `cache-teachers --revision`, `teacher_revisions`) decides which
weights load, and the feature cache's key records it.

The Hub is a real huggingface_hub cache on disk holding two revisions of each repository (`main` and the tag `v2`,
different weights), read offline in a fresh process (`HF_HUB_CACHE`, `HF_HUB_OFFLINE=1`): the same resolution a
download takes once the files are cached, for a transformers teacher (tiny SAM), a timm one (ConvNeXt) and the
`vitdet` backend's single file (EVA-02 ViTDet).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from _distill_fixtures import tiny_spec
from datasets import Dataset
from safetensors.torch import save_file

from movekd_hf.cli import main
from movekd_hf.distill import build_teacher
from movekd_hf.distill.teachers import _timm_hub_id
from movekd_hf.errors import SettingsError
from movekd_hf.training.arguments import MoVEKDModelArguments
from movekd_hf.training.distillation import recorded_teachers
from movekd_hf.training.teacher_source import run_teacher_specs
from movekd_hf.training.toy_data import make_toy_llava_dataset

COMMITS = {"main": "a" * 40, "v2": "b" * 40}
SEEDS = {"main": 0, "v2": 1}
SAM_REPO = "movekd-test/tiny-sam"
SIGLIP_REPO = "movekd-test/tiny-siglip"  # its config differs between revisions
EVA_REPO = "movekd-test/tiny-eva-det"  # a file of the authors' ViTDet layout (`vitdet` backend)


def _weights(spec, revision: str) -> torch.nn.Module:
    torch.manual_seed(SEEDS[revision])
    return build_teacher(spec).model


def _publish(hub: Path, repo: str, write) -> None:
    """`repo` in a huggingface_hub cache: one snapshot per revision, `write(folder, revision)` filling it."""
    root = hub / f"models--{repo.replace('/', '--')}"
    for revision, commit in COMMITS.items():
        snapshot = root / "snapshots" / commit
        snapshot.mkdir(parents=True)
        write(snapshot, revision)
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / revision).write_text(commit)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    hub = tmp_path_factory.mktemp("hub")
    _publish(hub, SAM_REPO, lambda folder, rev: _weights(tiny_spec("sam"), rev).save_pretrained(folder))
    convnext = tiny_spec("convnext")
    _publish(
        hub,
        _timm_hub_id(convnext),
        lambda folder, rev: save_file(_weights(convnext, rev).state_dict(), folder / "model.safetensors"),
    )
    eva = tiny_spec("eva")
    _publish(
        hub,
        EVA_REPO,
        lambda folder, rev: save_file(_weights(eva, rev).state_dict(), folder / "eva02_det.safetensors"),
    )
    _publish(hub, SIGLIP_REPO, _siglip)
    return hub


def _siglip(folder: Path, revision: str) -> None:
    """A SigLIP vision tower whose depth differs between revisions (2 layers on main, 3 on v2), with its processor."""
    import transformers

    config = transformers.SiglipVisionConfig(
        hidden_size=36, intermediate_size=44, num_hidden_layers=2 + SEEDS[revision], num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    torch.manual_seed(SEEDS[revision])
    transformers.SiglipVisionModel(config).save_pretrained(folder)
    processor = dict(do_resize=True, size={"height": 32, "width": 32}, resample=2, do_rescale=True, do_normalize=True,
                     image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))


def _offline(hub: Path, script: str, *args: str) -> None:
    _child({"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}, script, *args)


def _child(env: dict, script: str, *args: str) -> None:
    env = {**os.environ, **env}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


HUB_SPECS = {
    "sam": replace(tiny_spec("sam"), model_id=SAM_REPO, pretrained=True),
    "convnext": replace(tiny_spec("convnext"), pretrained=True),
    "eva": replace(tiny_spec("eva"), model_id=EVA_REPO, filename="eva02_det.safetensors", pretrained=True),
}

TEACHER_SCRIPT = """
import json, sys, torch
from dataclasses import replace
from movekd_hf.distill import build_teacher
from movekd_hf.distill.teachers import TeacherSpec
specs, out = json.loads(sys.argv[1]), {}
images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
for slug, fields in specs.items():
    spec = TeacherSpec(**{k: tuple(v) if k in ("mean", "std", "grid") and v else v for k, v in fields.items()})
    for revision in (None, "v2"):
        out[f"{slug}@{revision}"] = build_teacher(replace(spec, revision=revision))(images=images).tokens
torch.save(out, sys.argv[2])
"""


def test_a_teacher_loads_the_weights_of_its_revision(hub, tmp_path):
    """revision None takes the default branch (`main`), "v2" the tag's weights, for every backend."""
    out = tmp_path / "tokens.pt"
    _offline(hub, TEACHER_SCRIPT, json.dumps({slug: asdict(spec) for slug, spec in HUB_SPECS.items()}), str(out))
    _assert_tokens_of_each_revision(torch.load(out))


def test_a_teacher_downloads_its_revision_over_http(hub, tmp_path):
    """The same, downloaded into an empty cache from the Hub's file endpoints served over HTTP (`_hub_server.py`,
    `HF_ENDPOINT`): every backend asks for its files at the revision it names, and loads those weights."""
    from _hub_server import LocalHub

    server = LocalHub(hub)
    try:
        out = tmp_path / "tokens.pt"
        env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_ENDPOINT": server.endpoint, "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}  # fmt: skip
        _child(env, TEACHER_SCRIPT, json.dumps({slug: asdict(spec) for slug, spec in HUB_SPECS.items()}), str(out))
    finally:
        server.close()
    _assert_tokens_of_each_revision(torch.load(out))
    fetched = {path for method, path in server.requests if method == "GET" and "/resolve/" in path}
    weights = {SAM_REPO: "model.safetensors", _timm_hub_id(HUB_SPECS["convnext"]): "model.safetensors",
               EVA_REPO: "eva02_det.safetensors"}  # fmt: skip
    for (repo, name), revision in itertools.product(weights.items(), COMMITS):
        # transformers asks for config.json by the revision's name, then for the weights by the commit it got back
        by = {f"/{repo}/resolve/{revision}/{name}", f"/{repo}/resolve/{COMMITS[revision]}/{name}"}
        assert by & fetched, (repo, revision, sorted(fetched))
    assert all("/resolve/" in path or path.startswith("/api/models/") for _, path in server.requests), server.requests


def _assert_tokens_of_each_revision(got: dict) -> None:
    """`TEACHER_SCRIPT`'s tokens at revision None and "v2" are those of the weights saved as `main` and `v2`."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for slug, spec in HUB_SPECS.items():
        local = replace(spec, pretrained=False)
        for revision, key in (("main", f"{slug}@None"), ("v2", f"{slug}@v2")):
            torch.manual_seed(SEEDS[revision])
            want = build_teacher(local)(images=images).tokens
            torch.testing.assert_close(got[key], want, msg=f"{slug} at {revision}")
        assert not torch.allclose(got[f"{slug}@None"], got[f"{slug}@v2"])


CLI_SCRIPT = """
import sys
from movekd_hf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _tokens(cache: Path) -> torch.Tensor:
    (folder,) = [path for path in cache.iterdir() if path.is_dir()]
    shards = sorted(folder.glob("shard-*.arrow"))
    return torch.cat([torch.tensor(Dataset.from_file(str(shard))["tokens"]) for shard in shards])


def test_cache_teachers_revision_loads_those_weights_and_keys_the_cache(hub, tmp_path):
    """`--revision sam=v2` writes what the v2 weights give (the same as those weights from a local folder), not what
    `main` gives, and its key says v2; training with `teacher_revisions` reads that key."""
    paths = make_toy_llava_dataset(tmp_path / "toy", num_samples=3, seed=1)
    specs = tmp_path / "teachers.json"
    specs.write_text(json.dumps([asdict(HUB_SPECS["sam"])]))
    common = ["cache-teachers", "--data-path", paths.pretrain_json, "--image-folder", paths.image_folder]
    common += ["--teachers-json", str(specs), "--student-grid", "4", "--no-progress"]
    v2_folder = hub / f"models--{SAM_REPO.replace('/', '--')}" / "snapshots" / COMMITS["v2"]
    runs = {"v2": ["--revision", "sam=v2"], "main": [], "local": ["--checkpoint", f"sam={v2_folder}"]}
    for name, extra in runs.items():
        _offline(hub, CLI_SCRIPT, *common, "--cache-dir", str(tmp_path / name), *extra)
    tokens = {name: _tokens(tmp_path / name) for name in runs}
    assert torch.equal(tokens["v2"], tokens["local"]) and not torch.equal(tokens["v2"], tokens["main"])
    keys = {name: json.loads(next((tmp_path / name).glob("*/cache.json")).read_text())["key"] for name in runs}
    assert keys["v2"]["revision"] == "v2" and keys["main"]["revision"] is None

    # Training names the same revision through `teacher_revisions`: its specs hash to the written directory.
    from movekd_hf.distill.cache import cache_key

    assert keys["v2"] == cache_key(replace(HUB_SPECS["sam"], revision="v2"), _settings_of(keys["v2"]))


def _settings_of(key: dict):
    """The `CacheSettings` a stored key was written with (its settings fields)."""
    from movekd_hf.distill.cache import CacheSettings

    return CacheSettings(
        student_grid=tuple(key["student_grid"]),
        grid=key["grid"],
        teacher_image_size=key["teacher_image_size"],
        image_aspect=key["image_aspect"],
        background=tuple(key["background"]),
        teacher_inputs=key.get("teacher_inputs", "square"),
    )


def test_revision_options_name_the_field_and_the_unknown_teacher(capsys):
    args = MoVEKDModelArguments(preset="tiny", teacher_set="tiny", teacher_revisions="sam=v2, convnext=abc123")
    assert args.revision_map() == {"sam": "v2", "convnext": "abc123"}
    specs = {spec.slug: spec for spec in run_teacher_specs("v1.1", True, {}, args.revision_map())}
    assert specs["sam"].revision == "v2" and specs["convnext"].revision == "abc123"
    # The tiny sets' teachers have random weights: a revision (or a checkpoint) of theirs would load nothing.
    with pytest.raises(SettingsError, match=r"field 'teacher_revisions': names \['sam'\], built here with random"):
        run_teacher_specs("tiny", True, {}, {"sam": "v2"})
    with pytest.raises(SettingsError, match=r"field 'teacher_checkpoints': names \['sam'\], built here with random"):
        run_teacher_specs("tiny", True, {"sam": "/weights/sam"})
    with pytest.raises(SettingsError, match=r"field 'teacher_revisions': entry 'sam' is not slug=rev"):
        MoVEKDModelArguments(preset="tiny", teacher_revisions="sam").revision_map()
    with pytest.raises(SettingsError, match=r"field 'teacher_revisions': names \['eva'\], not teachers of this set"):
        run_teacher_specs("tiny", False, {}, {"eva": "v2"})
    assert main(["cache-teachers", "--teacher-set", "tiny", "--revision", "eva=v2", "--estimate"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        "movekd-hf cache-teachers: error: field '--revision': names ['eva'], not teachers of this set; "
        "expected one of ['clip', 'convnext', 'sam']"
    )


def test_the_run_record_names_a_pinned_revision():
    class Distiller:
        teacher_names = ("clip", "sam", "convnext")

    specs = [replace(tiny_spec("sam"), revision="v2"), tiny_spec("convnext")]
    records = {record["name"]: record for record in recorded_teachers(Distiller(), specs)}
    assert records["sam"]["revision"] == "v2" and "revision" not in records["convnext"]


BY_ID_SCRIPT = """
import json, sys
from movekd_hf.distill import build_teacher, teacher_from_pretrained
out = {}
for revision in (None, "v2"):
    spec = teacher_from_pretrained(sys.argv[1], revision=revision)
    teacher = build_teacher(spec)
    layers = {key.split("layers.")[1].split(".")[0] for key in teacher.model.state_dict() if "layers." in key}
    out[str(revision)] = [spec.revision, spec.config["num_hidden_layers"], len(layers)]
json.dump(out, open(sys.argv[2], "w"))
"""


def test_a_teacher_by_id_reads_its_configs_at_the_revision(hub, tmp_path):
    """`teacher_from_pretrained(id, revision=...)` reads config.json at that revision (the v2 tower is deeper) and
    the spec it writes loads those weights."""
    out = tmp_path / "by_id.json"
    _offline(hub, BY_ID_SCRIPT, SIGLIP_REPO, str(out))
    assert json.loads(out.read_text()) == {"None": [None, 2, 2], "v2": ["v2", 3, 3]}
