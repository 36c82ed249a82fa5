"""Training reads teacher features that `movekd-hf cache-teachers --model` wrote, with the loss online teachers
give (up to float16 storage), and refuses a cache written for another data view. A SigLIP student's anchor caches
its pooling head's outputs (token weights and teacher weights come from them), and the summary loss reads the
cached CLS / pooled vectors."""

import json

import pytest
import torch
import yaml
from _model_fixtures import TINY_TEXT
from _train_fixtures import TINY_STAGE1, build
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from movekd_hf.cli import main
from movekd_hf.models import build_byte_tokenizer
from movekd_hf.training.toy_data import make_toy_llava_dataset


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cached")
    assert main(["init", "--preset", "tiny", "--out", str(root / "init")]) == 0
    toy = make_toy_llava_dataset(root / "toy", num_samples=12, seed=0)
    data = ["--data_path", str(toy.pretrain_json), "--image_folder", str(toy.image_folder)]
    # No --grid: with --model the cache takes training's defaults (teacher_cache_grid: native), the README's route.
    command = ["cache-teachers", "--model", str(root / "init"), "--teacher-set", "tiny", "--random-weights",
               "--data-path", str(toy.pretrain_json), "--image-folder", str(toy.image_folder),
               "--cache-dir", str(root / "cache"), "--seed", "42", "--no-progress"]  # fmt: skip
    assert main(command) == 0
    config = yaml.safe_load(open(TINY_STAGE1))
    config.pop("preset")  # start from the folder the cache was written for
    config["model_name_or_path"] = str(root / "init")
    (root / "stage1.yaml").write_text(yaml.safe_dump(config))
    return root, [str(root / "stage1.yaml"), *data, "--seed", "42"]


def first_batch_loss(trainer) -> dict:
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()  # no dropout: both runs must see identical student tokens
    with torch.no_grad():
        loss, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    kd = out["kd"]
    got = {"loss": loss, "kd": kd["loss"], "per_teacher": kd["per_teacher_loss"], "weights": kd["teacher_weights"]}
    return got | {name: kd[name] for name in ("token_weights", "summary_loss", "summary_teachers") if name in kd}


def assert_same_loss(got: dict, expected: dict, names=None) -> None:
    """Float16-stored tokens against the online teachers' float32 ones: rtol 2e-3, atol 1e-4. The anchor's own loss
    is 0 online (its tokens are the student's at step 1) and ~1e-5 from its float16-rounded cached tokens, beside
    ~5 for the other teachers; everything else also agrees within rtol 2e-3. `names`: the entries compared (all)."""
    assert got.keys() == expected.keys() and got.get("summary_teachers") == expected.get("summary_teachers")
    for name in sorted(names or got.keys() - {"summary_teachers"}):
        torch.testing.assert_close(got[name], expected[name], rtol=2e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_cached_teachers_give_the_online_loss(cached_run):
    root, common = cached_run
    online = build(common[0], root / "online", *common[1:])
    cached = build(
        TINY_STAGE1,
        root / "cached_out",
        *common[1:],
        "--teacher_source",
        "cached",
        "--teacher_cache_dir",
        str(root / "cache"),
    )
    assert type(cached.teacher_source).__name__ == "CachedTeachers"
    expected, got = first_batch_loss(online), first_batch_loss(cached)
    assert expected["kd"] > 0 and expected["per_teacher"].shape[1] == 3  # clip, convnext, sam
    for name in ("loss", "kd", "per_teacher", "weights"):
        torch.testing.assert_close(got[name], expected[name], rtol=2e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_the_size_estimate_for_the_model_is_what_its_cache_stores(cached_run, capsys):
    """`cache-teachers --estimate --model` (the anchor's spec sized from the student's config, no weights loaded):
    the bytes per image it prints are those of the cache written for that model."""
    from movekd_hf.distill.cache import TeacherCache

    root, _ = cached_run
    capsys.readouterr()
    argv = ["cache-teachers", "--estimate", "--model", str(root / "init"), "--teacher-set", "tiny",
            "--random-weights", "--grid", "native", "--num-images", "10"]  # fmt: skip
    assert main(argv) == 0
    written = sum(TeacherCache(directory).meta["bytes_per_image"] for directory in (root / "cache").iterdir())
    out = capsys.readouterr().out
    assert f"| all | | | {written:,} " in out and f"total for 10 images: {written * 10:,} bytes" in out
    # With --data-path and no --num-images, the total is for the data's images (the toy data has 12); a data path
    # that is not there is refused in estimate mode too.
    data = ["--data-path", str(root / "toy" / "pretrain.json"), "--image-folder", str(root / "toy" / "images")]
    assert main([*argv[:-2], *data]) == 0
    assert f"total for 12 images: {written * 12:,} bytes" in capsys.readouterr().out
    assert main([*argv[:-2], "--data-path", str(root / "nowhere.json")]) == 2
    assert "field '--data-path': does not exist" in capsys.readouterr().err


def test_training_reads_the_cache_as_an_exported_repository_from_a_folder_and_from_the_hub(cached_run, tmp_path):
    """`teacher_cache_dir` takes the cache's `--export-repo` folder, or the id of a Hub dataset repository holding
    it (downloaded by `snapshot_download` from the Hub's endpoints, served over HTTP by `_hub_server.py`): one
    `movekd-hf train` step logs the same losses as from the cache folder itself."""
    import shutil
    import subprocess
    import sys

    from _hub_server import LocalHub
    from _train_fixtures import child_env

    root, common = cached_run
    repo = tmp_path / "repo"
    export = ["cache-teachers", "--model", str(root / "init"), "--teacher-set", "tiny", "--random-weights",
              "--data-path", common[2], "--image-folder", common[4], "--cache-dir", str(root / "cache"), "--grid",
              "native", "--seed", "42", "--no-progress", "--export-repo", str(repo)]  # fmt: skip
    assert main(export) == 0
    hub = tmp_path / "hub" / "datasets--movekd-test--tiny-cache"
    shutil.copytree(repo, hub / "snapshots" / ("c" * 40))
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("c" * 40)

    def one_step(name: str, cache: str, **env: str) -> list[dict]:
        argv = [sys.executable, "-m", "movekd_hf.cli", "train", common[0], "--output_dir", str(tmp_path / name),
                *common[1:], "--max_steps", "1", "--save_steps", "1", "--logging_steps", "1", "--disable_tqdm",
                "true", "--teacher_source", "cached", "--teacher_cache_dir", cache]  # fmt: skip
        done = subprocess.run(argv, env=child_env(**env), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        state = json.loads((tmp_path / name / "checkpoint-1" / "trainer_state.json").read_text())
        return [
            {k: v for k, v in entry.items() if "loss" in k} for entry in state["log_history"] if "kd_loss" in entry
        ]

    expected = one_step("folder", str(root / "cache"))
    assert expected and expected[0]["kd_loss"] > 0
    assert one_step("repo", str(repo)) == expected
    server = LocalHub(tmp_path / "hub")
    try:
        online = dict(HF_ENDPOINT=server.endpoint, HF_HUB_CACHE=str(tmp_path / "downloads"), HF_HUB_OFFLINE="0",
                      HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")  # fmt: skip
        assert one_step("hub", "movekd-test/tiny-cache", **online) == expected
    finally:
        server.close()
    fetched = {path for method, path in server.requests if method == "GET"}
    assert any(path.startswith("/datasets/movekd-test/tiny-cache/resolve/") for path in fetched), fetched


def test_a_cache_for_another_view_is_refused(cached_run):
    root, common = cached_run
    with pytest.raises(ValueError, match="image_aspect"):
        build(
            TINY_STAGE1, root / "refused", *common[1:], "--teacher_source", "cached",
            "--teacher_cache_dir", str(root / "cache"), "--image_aspect", "resize",
        )  # fmt: skip
    with pytest.raises(ValueError, match="teacher_cache_dir"):
        build(common[0], root / "nodir", *common[1:], "--teacher_source", "cached")


def test_a_missing_or_stale_cache_ends_movekd_hf_train_in_one_line(cached_run, tmp_path, capsys):
    """A cache folder written for another view, a folder that is not there and a Hub id the (offline) Hub cache
    lacks: each is one line naming `teacher_cache_dir`, exit 2."""
    root, common = cached_run
    cases = [  # (teacher_cache_dir, other options, what the line says)
        (str(root / "cache"), ["--image_aspect", "resize"], "image_aspect: cache has 'pad', expected 'resize'"),
        (
            str(root / "cache"),
            ["--teacher_cache_grid", "student"],
            "grid: cache has 'native', expected 'student' (--grid / teacher_cache_grid)",
        ),
        (str(tmp_path / "missing"), [], "no cache under"),
        ("movekd-test/no-such-cache", [], "is no local folder and the Hub gave no dataset repository"),
    ]
    for cache, extra, says in cases:
        capsys.readouterr()
        argv = ["train", common[0], "--output_dir", str(tmp_path / "out"), *common[1:], "--teacher_source",
                "cached", "--teacher_cache_dir", cache, *extra]  # fmt: skip
        assert main(argv) == 2, cache
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("movekd-hf ")]
        assert line.startswith("movekd-hf train: error: field 'teacher_cache_dir': ") and says in line, line


def test_training_reads_a_compressed_cache(cached_run):
    """A PCA + int8 cache (`cache-teachers --compression pca --token-dtype int8`) is read by training given the
    same compression settings; without them the run looks for the uncompressed cache's key and is refused."""
    root, common = cached_run
    toy = root / "toy"
    compressed = ["--compress", "convnext=8", "--compress", "sam=8", "--compression", "pca", "--token-dtype", "int8",
                  "--calibration-images", "8"]  # fmt: skip
    command = ["cache-teachers", "--model", str(root / "init"), "--teacher-set", "tiny", "--random-weights",
               "--data-path", str(toy / "pretrain.json"), "--image-folder", str(toy / "images"),
               "--cache-dir", str(root / "pca_cache"), "--grid", "native", "--seed", "42", "--no-progress",
               *compressed]  # fmt: skip
    assert main(command) == 0
    reading = ["--teacher_source", "cached", "--teacher_cache_dir", str(root / "pca_cache")]
    settings = ["--teacher_cache_compress", "convnext=8,sam=8", "--teacher_cache_compression", "pca",
                "--teacher_cache_token_dtype", "int8", "--teacher_cache_calibration_images", "8"]  # fmt: skip
    online = build(common[0], root / "online_pca", *common[1:])
    cached = build(common[0], root / "cached_pca", *common[1:], *reading, *settings)
    expected, got = first_batch_loss(online), first_batch_loss(cached)
    assert torch.isfinite(got["loss"]) and got["per_teacher"].shape == expected["per_teacher"].shape
    assert not torch.equal(got["per_teacher"], expected["per_teacher"])  # the features really were compressed
    with pytest.raises(ValueError):  # the same folder read as an uncompressed cache: another key
        build(common[0], root / "wrong_key", *common[1:], *reading)


def test_the_summary_loss_reads_the_cached_cls(cached_run):
    """kd_options summary_loss_weight 0.5: the CLIP anchor's CLS comes from the cache (the tiny set's convnext and
    sam have none), and the summary loss and the total are the online ones (the per-teacher token losses are
    `test_cached_teachers_give_the_online_loss`'s)."""
    root, common = cached_run
    options = ["--kd_options", json.dumps({"summary_loss_weight": 0.5})]
    online = build(common[0], root / "online_summary", *common[1:], *options)
    reading = ["--teacher_source", "cached", "--teacher_cache_dir", str(root / "cache")]
    cached = build(common[0], root / "cached_summary", *common[1:], *options, *reading)
    expected, got = first_batch_loss(online), first_batch_loss(cached)
    assert expected["summary_teachers"] == ["clip"] and expected["summary_loss"] > 0
    assert_same_loss(got, expected, names=("summary_loss", "loss", "kd", "weights", "token_weights"))


# A tiny SigLIP tower with its attention-pooling head: 32 px in 8 px patches (4 x 4), 36 wide, 3 heads.
TINY_SIGLIP = dict(hidden_size=36, intermediate_size=52, num_hidden_layers=3, num_attention_heads=3, image_size=32,
                   patch_size=8, layer_norm_eps=1e-6)  # fmt: skip


@pytest.fixture(scope="module")
def siglip_cached_run(tmp_path_factory):
    """`init --vision` on a tiny SigLIP folder, then `cache-teachers --model` on it (anchor `siglip` + the tiny set)."""
    root = tmp_path_factory.mktemp("siglip_cached")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)).save_pretrained(root / "tower")
    text = {k: v for k, v in TINY_TEXT.items() if k not in ("vocab_size", "pad_token_id")}
    LlamaForCausalLM(LlamaConfig(vocab_size=256 + 3, **text)).save_pretrained(root / "llm")
    build_byte_tokenizer(special_tokens=("<unk>", "<s>", "</s>")).save_pretrained(root / "llm")
    init = ["init", "--vision", str(root / "tower"), "--llm", str(root / "llm"), "--out", str(root / "init")]
    assert main(init) == 0
    toy = make_toy_llava_dataset(root / "toy", num_samples=12, seed=0)
    # No --grid: with --model the cache takes training's defaults (teacher_cache_grid: native), the README's route.
    command = ["cache-teachers", "--model", str(root / "init"), "--teacher-set", "tiny", "--random-weights",
               "--data-path", str(toy.pretrain_json), "--image-folder", str(toy.image_folder),
               "--cache-dir", str(root / "cache"), "--seed", "42", "--no-progress"]  # fmt: skip
    assert main(command) == 0
    data = ["--data_path", str(toy.pretrain_json), "--image_folder", str(toy.image_folder)]
    common = [TINY_STAGE1, "--model_name_or_path", str(root / "init"), *data, "--seed", "42", "--teacher_set", "tiny"]
    return root, common


def test_a_siglip_student_with_its_head_trains_from_the_cache_with_the_online_loss(siglip_cached_run):
    """The anchor's pooled output and probe row come from the cache: token weights (pool_attention), teacher
    weights (anchor_summary 'pooled') and, with summary_loss_weight, the summary loss match the online teachers'."""
    root, common = siglip_cached_run
    reading = ["--teacher_source", "cached", "--teacher_cache_dir", str(root / "cache")]
    for name, options in (("plain", []), ("summary", ["--kd_options", json.dumps({"summary_loss_weight": 0.5})])):
        online = build(common[0], root / f"online_{name}", *common[1:], *options)
        cached = build(common[0], root / f"cached_{name}", *common[1:], *options, *reading)
        config = cached.model.distiller.config
        assert (config.anchor_teacher, config.token_weighting, config.anchor_summary) == (
            "siglip", "pool_attention", "pooled"
        )  # fmt: skip
        assert type(cached.teacher_source).__name__ == "CachedTeachers"
        batch = next(iter(cached.get_train_dataloader()))
        anchor = cached.teacher_source(batch)["siglip"]  # [4 images]: the head's 36-wide output, 4 x 4 probe row
        assert anchor.pooled.shape == (4, 36) and anchor.pool_attention.shape == (4, 16) and anchor.cls is None
        expected, got = first_batch_loss(online), first_batch_loss(cached)
        assert expected["kd"] > 0 and expected["per_teacher"].shape[1] == 3  # siglip, convnext, sam
        assert expected["token_weights"] is not None
        assert ("summary_loss" in expected) == (name == "summary")
        assert_same_loss(got, expected)
