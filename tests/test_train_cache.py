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
