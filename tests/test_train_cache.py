"""Training reads teacher features that `movekd-hf cache-teachers --model` wrote, with the loss online teachers
give (up to float16 storage), and refuses a cache written for another data view."""

import pytest
import torch
import yaml
from _train_fixtures import TINY_STAGE1, build

from movekd_hf.cli import main
from movekd_hf.training.toy_data import make_toy_llava_dataset


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cached")
    assert main(["init", "--preset", "tiny", "--out", str(root / "init")]) == 0
    toy = make_toy_llava_dataset(root / "toy", num_samples=12, seed=0)
    data = ["--data_path", str(toy.pretrain_json), "--image_folder", str(toy.image_folder)]
    command = ["cache-teachers", "--model", str(root / "init"), "--teacher-set", "tiny", "--random-weights",
               "--data-path", str(toy.pretrain_json), "--image-folder", str(toy.image_folder),
               "--cache-dir", str(root / "cache"), "--grid", "native", "--seed", "42", "--no-progress"]  # fmt: skip
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
    return {"loss": loss, "kd": kd["loss"], "per_teacher": kd["per_teacher_loss"], "weights": kd["teacher_weights"]}


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


def test_a_cache_for_another_view_is_refused(cached_run):
    root, common = cached_run
    with pytest.raises(ValueError, match="image_aspect"):
        build(
            TINY_STAGE1, root / "refused", *common[1:], "--teacher_source", "cached",
            "--teacher_cache_dir", str(root / "cache"), "--image_aspect", "resize",
        )  # fmt: skip
    with pytest.raises(ValueError, match="teacher_cache_dir"):
        build(common[0], root / "nodir", *common[1:], "--teacher_source", "cached")


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
