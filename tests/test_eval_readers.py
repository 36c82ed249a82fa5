"""Benchmark readers: official layouts and datasets folders -> samples with LLaVA-1.5's prompts + ground truth."""

from pathlib import Path

import pytest

from movekd_hf.evaluation import prompts
from movekd_hf.evaluation.readers import load_benchmark, read_records

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def test_short_answer_prompts_and_image_paths(tmp_path):
    vqa = load_benchmark("vqav2", FIXTURES / "vqav2" / "v2_mscoco_val2014_annotations.json", tmp_path)
    assert vqa.samples[0].prompt == "How many?" + SHORT
    assert vqa.samples[0].image == str(tmp_path / "COCO_val2014_000000000101.jpg")
    gqa = load_benchmark("gqa", FIXTURES / "gqa" / "testdev_balanced_questions.json", tmp_path)
    assert gqa.samples[0].image == str(tmp_path / "n161313.jpg")
    textvqa = load_benchmark("textvqa", FIXTURES / "textvqa" / "TextVQA_0.5.1_val.json", tmp_path)
    assert textvqa.samples[1].image == str(tmp_path / "003a8ae2ef43b902.jpg")


def test_vizwiz_prompt_adds_unanswerable_first():
    vizwiz = load_benchmark("vizwiz", FIXTURES / "vizwiz" / "val.json")
    assert vizwiz.samples[0].prompt == "What is this?\n" + prompts.UNANSWERABLE + SHORT
    assert [s.key for s in vizwiz.samples] == ["0", "1", "2"]  # position in val.json, as LLaVA numbers them


def test_scienceqa_keeps_image_questions_with_context_and_letters():
    sqa = load_benchmark("scienceqa", FIXTURES / "scienceqa" / "problems.json", "test_images")
    assert [s.key for s in sqa.samples] == ["1", "2", "3", "5"]  # no image (4) and train (6) left out
    assert sqa.samples[1].prompt == ("Context: Look at the picture.\nWhich is heavier?\nA. a brick\nB. a feather"
                                     "\nC. a leaf" + LETTER)  # fmt: skip
    assert sqa.samples[0].image == str(Path("test_images") / "1" / "image.png")


def test_mmbench_rounds_prompts_and_images():
    mmb = load_benchmark("mmbench", FIXTURES / "mmbench" / "mmbench_dev_20230712.tsv")
    assert [s.key for s in mmb.samples] == ["0/0", "0/1", "0/2", "1/0", "1/1"]
    assert mmb.samples[4].prompt == "A pet.\nWhich animal?\nA. dog\nB. cat" + LETTER
    assert mmb.samples[0].prompt.startswith("What color is the sky in the picture?\nA. red")  # "nan" hint dropped
    assert mmb.samples[0].image.size == (4, 4) and mmb.samples[0].image.mode == "RGB"  # decoded from base64


def test_mme_both_layouts():
    mme = load_benchmark("mme", FIXTURES / "mme" / "MME_Benchmark_release_version")
    categories = [s.category for s in mme.samples]
    assert categories.count("OCR") == 2 and categories.count("existence") == 4  # questions_answers_YN/ and flat
    assert all(Path(s.image).is_file() for s in mme.samples)
    assert mme.samples[0].prompt.endswith("Please answer yes or no." + SHORT)


def test_llava_question_file_sets_prompts_and_order():
    pope = load_benchmark("pope", FIXTURES / "pope" / "coco", "imgs", FIXTURES / "pope" / "llava_pope_test.jsonl")
    assert [s.key for s in pope.samples][:5] == ["random/1", "random/2", "random/3", "random/4", "adversarial/1"]
    assert pope.samples[0].prompt == "Is there a dog in the image?" + SHORT
    assert pope.samples[0].image == str(Path("imgs") / "COCO_val2014_random_0.jpg")


def test_hf_datasets_folder(tmp_path):
    import datasets
    from skimage import data as images

    image = images.astronaut()[::64, ::64]
    rows = {"question_id": [1, 1], "question": ["Is there a man in the image?"] * 2, "answer": ["yes", "no"],
            "category": ["random", "popular"], "image": [image, image]}  # fmt: skip
    features = datasets.Features({"question_id": datasets.Value("int64"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "category": datasets.Value("string"),
                                  "image": datasets.Image()})  # fmt: skip
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(tmp_path / "pope")
    pope = load_benchmark("pope", tmp_path / "pope")
    assert [s.key for s in pope.samples] == ["random/1", "popular/1"]
    assert pope.samples[0].image.size == (8, 8)
    assert pope.score({"random/1": "Yes", "popular/1": "Yes"})["accuracy"] == pytest.approx(50.0)


def test_reader_errors_name_the_file_and_field(tmp_path):
    (tmp_path / "val.json").write_text('[{"image": "x.jpg"}]')
    with pytest.raises(ValueError, match="val.json: a vizwiz entry lacks the field 'question'"):
        read_records("vizwiz", tmp_path / "val.json")
    with pytest.raises(FileNotFoundError, match="questions file"):
        read_records("vqav2", tmp_path / "val.json")
    with pytest.raises(FileNotFoundError, match="no coco_pope_"):
        read_records("pope", tmp_path)


def test_hf_vqav2_and_mmbench_layouts(tmp_path):
    import datasets
    from skimage import data as images

    image = images.coffee()[::50, ::50]
    answers = [
        [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate(["2"] * 3 + ["3"] * 7)]
    ]
    datasets.Dataset.from_dict(
        {
            "question_id": [7],
            "question": ["How many?"],
            "answers": answers,
            "answer_type": ["number"],
            "image": [image],
        },  # fmt: skip
        features=datasets.Features(
            {
                "question_id": datasets.Value("int64"),
                "question": datasets.Value("string"),
                "answers": [
                    {
                        "answer": datasets.Value("string"),
                        "answer_confidence": datasets.Value("string"),
                        "answer_id": datasets.Value("int64"),
                    }
                ],
                "answer_type": datasets.Value("string"),
                "image": datasets.Image(),
            }
        ),  # fmt: skip
    ).save_to_disk(tmp_path / "vqav2")
    vqa = load_benchmark("vqav2", tmp_path / "vqav2")
    assert vqa.samples[0].prompt == "How many?" + SHORT
    assert vqa.score({"7": "two"})["accuracy_number"] == pytest.approx(90.0)
    rows = {"index": [3], "question": ["Which?"], "hint": [None], "A": ["x"], "B": ["y"], "C": [None], "D": [None],
            "answer": ["B"], "category": ["c"], "image": [image]}  # fmt: skip
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "mmb")
    mmb = load_benchmark("mmbench", tmp_path / "mmb")
    assert [s.key for s in mmb.samples] == ["3/0", "3/1"] and mmb.samples[0].prompt == "Which?\nA. x\nB. y" + LETTER
    assert mmb.score({"3/0": "B", "3/1": "A"})["accuracy"] == 100.0
