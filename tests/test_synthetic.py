"""synthetic.py and evaluate.py --utility / --memorization on tiny data: the classifier scores
against hand-computed values, CAS of real images near the real-data score and of noise near
chance, an augmentation table with every row and seed, a memorisation ratio of 0 for copies and
about 1 for held-out images, the pairs picture, the JSON keys, and the one-line refusals."""
import json

import numpy as np
import pytest
import torch

import evaluate
from evaluation import distances, features, studies
from conftest import make_images, run_script
from data import Split

NUM_CLASSES = 8  # the tiny BloodMNIST-layout files of conftest
from models.classifier import Classifier

CPU = torch.device("cpu")
# A recipe that learns the tiny discs in ~100 steps: three stages of pooling, a high rate.
LEARNS = {"widths": [16, 32, 32], "epochs": 6, "batch_size": 16, "lr": 1e-2}


def split(n: int, seed: int) -> Split:
    images, labels = make_images(n, seed)
    return Split(images, labels.reshape(-1).astype(np.int64), NUM_CLASSES)


@pytest.fixture
def recipe(monkeypatch):
    """Set the classifiers' recipe for one test."""
    return lambda **settings: monkeypatch.setattr(features, "RECIPE", {**features.RECIPE, **settings})


def real_images_of(data: Split) -> studies.Generate:
    """A 'generator' that returns real images of the asked class, picked at random."""
    def generate(labels: torch.Tensor, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        picks = [rng.choice(np.flatnonzero(data.labels == c)) for c in labels.tolist()]
        return torch.from_numpy(data.images[picks]).permute(0, 3, 1, 2)
    return generate


def noise_like(data: Split) -> studies.Generate:
    return lambda labels, seed: distances.pixel_noise(data.images, len(labels), torch.Generator().manual_seed(seed))


def test_roc_auc_counts_pairs_with_ties_as_half():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.randint(0, 6, (40,), generator=g).double()  # many ties
        positive = torch.rand(40, generator=g) < 0.3
        pos, neg = scores[positive], scores[~positive]
        pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
        assert features.roc_auc(scores, positive) == pytest.approx(pairs.mean().item(), abs=1e-12)


def test_classification_scores_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    predicted = torch.tensor([0, 0, 1, 1, 2, 0])
    logits = torch.full((6, NUM_CLASSES), -5.0)
    logits[torch.arange(6), predicted] = 5.0
    s = features.classification_scores(logits, labels)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["recall"][:3] == pytest.approx([2 / 3, 1.0, 0.5]) and s["recall"][3:] == [None] * 5
    assert s["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0.5) / 3)  # absent classes left out
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=int)
    np.add.at(confusion, (labels.numpy(), predicted.numpy()), 1)
    assert s["confusion"] == confusion.tolist() and s["confusion"][2][:3] == [1, 0, 1]
    perfect = features.classification_scores(torch.nn.functional.one_hot(labels, NUM_CLASSES).double(), labels)
    assert perfect["accuracy"] == perfect["balanced_accuracy"] == perfect["auc"] == 1.0


def test_stratified_subset_keeps_every_class_and_depends_on_the_seed():
    data = split(160, 0)  # 20 images a class
    a, b = (studies.stratified_subset(data, 0.1, seed) for seed in (0, 1))
    assert np.bincount(a.labels, minlength=NUM_CLASSES).tolist() == [2] * NUM_CLASSES
    assert not np.array_equal(a.images, b.images)
    assert len(studies.stratified_subset(data, 0.001, 0)) == NUM_CLASSES  # at least one each
    assert len(studies.stratified_subset(data, 1.0, 0)) == len(data)


def test_cas_of_real_images_matches_the_real_score_and_noise_sits_at_chance(recipe):
    recipe(**LEARNS)
    train, test = split(256, 0), split(128, 2)
    rows = {r["name"]: r for r in studies.cas({"real": real_images_of(train), "noise": noise_like(train)},
                                                train, test, CPU)}
    ceiling, floor = rows["real train split (ceiling)"], rows["pixel noise, real labels (floor)"]
    assert ceiling["accuracy"] > 0.9
    assert rows["real"]["accuracy"] > ceiling["accuracy"] - 0.1
    assert rows["real"]["images"] == len(train)
    for row in (floor, rows["noise"]):  # no better than chance (1/8 balanced accuracy, AUC 1/2): a
        # classifier fitted to noise maps the test images to arbitrary classes, at or below chance
        assert row["balanced_accuracy"] < 1 / NUM_CLASSES + 0.1 and abs(row["auc"] - 0.5) < 0.2
    assert all(len(r["recall"]) == NUM_CLASSES for r in rows.values())


def test_cas_reuses_a_given_ceiling_classifier(recipe):
    recipe(widths=[8], epochs=1, batch_size=16)
    train, test = split(64, 0), split(32, 2)
    given = Classifier(widths=(8,)).eval()
    rows = studies.cas({}, train, test, CPU, ceiling=given)
    expected = features.classification_scores(features.predict(given, test.images)[1], test.labels)
    assert rows[0]["accuracy"] == expected["accuracy"] and rows[0]["auc"] == expected["auc"]


def test_augmentation_has_every_row_and_seed(recipe):
    recipe(widths=[8], epochs=1, batch_size=16)
    train, test = split(128, 0), split(32, 2)
    rows = studies.augmentation({"copies": real_images_of(train)}, train, test, CPU,
                                  fractions=(0.25, 1.0), seeds=(0, 1, 2), ratio=2.0)
    assert [(r["fraction"], r["training_set"]) for r in rows] == [
        (0.25, "real only"), (0.25, "copies"), (1.0, "real only"), (1.0, "copies")]
    for row in rows:
        assert row["seeds"] == [0, 1, 2] and len(row["accuracy"]) == 3
        assert row["accuracy_mean"] == pytest.approx(np.mean(row["accuracy"]))
        assert row["accuracy_std"] == pytest.approx(np.std(row["accuracy"], ddof=1))
        assert row["real_images"] == (32 if row["fraction"] == 0.25 else 128)  # 4 or 16 a class
        assert row["synthetic_images"] == (0 if row["training_set"] == "real only" else 2 * row["real_images"])
    for alone, added in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert "gain" not in alone
        assert added["gain"] == pytest.approx(np.subtract(added["accuracy"], alone["accuracy"]).tolist())


def test_memorization_ratio_is_zero_for_copies_and_about_one_for_held_out_images():
    train, heldout, fresh = (torch.from_numpy(make_images(n, seed)[0]).permute(0, 3, 1, 2)
                             for n, seed in ((96, 0), (96, 1), (96, 2)))
    fnet = Classifier(widths=(8, 16)).eval()  # any fixed embedding will do for the ratio
    check = lambda generated: studies.memorization(
        {"generated": generated, "train": train, "heldout": heldout},
        {who: features.predict(fnet, images)[0] for who, images in
         (("generated", generated), ("train", train), ("heldout", heldout))}, CPU)
    copies = train[torch.randperm(96, generator=torch.Generator().manual_seed(0))]
    summary, pairs = check(copies)
    for space in ("feature", "pixel"):
        assert summary[space]["median_ratio"] == pytest.approx(0, abs=1e-6)
        assert summary[space]["share_below_heldout_p5"] == 1.0
    assert torch.equal(train[pairs["generated"][1]], copies)  # each copy found its original
    summary, _ = check(fresh)
    for space in ("feature", "pixel"):
        assert 0.8 < summary[space]["median_ratio"] < 1.25
        assert summary[space]["share_below_heldout_p5"] < 0.2


def test_evaluate_utility_and_memorization_write_tables_json_and_pairs(ckpts, data_root, feature_cache, tmp_path, capsys):
    out = tmp_path / "r.json"
    evaluate.main(["--device", "cpu", "--data-root", str(data_root), "--feature-cache", str(feature_cache),
                   "--kid-subsets", "2", "--kid-subset-size", "8", "--n", "24", "--no-reference",
                   str(ckpts["cgan"]), "--utility", "--memorization", "--fractions", "0.5,1", "--seeds", "2",
                   "--json", str(out)])
    printed = capsys.readouterr().out
    for title in ("Train on synthetic, test on real", "Augmentation", "Memorisation"):
        assert title in printed
    results = json.loads(out.read_text())
    # --no-reference leaves out the noise floor; the ceiling is the feature network, already trained
    assert [r["name"] for r in results["cas"]] == ["real train split (ceiling)", "cgan (EMA)", "cgan (EMA), 5x real"]
    assert [r["images"] for r in results["cas"][1:]] == [64, 320]  # 1 and 5 times the 64 real training images
    assert [(r["fraction"], r["training_set"]) for r in results["augmentation"]] == [
        (0.5, "real only"), (0.5, "cgan (EMA)"), (1.0, "real only"), (1.0, "cgan (EMA)")]
    (mem,) = results["memorization"]
    assert mem["n_generated"] == 24 and mem["train_images"] == 64 and mem["n_heldout"] == 16
    assert (ckpts["cgan"].parent / "memorization_pairs.png").is_file()
    beside = json.loads((ckpts["cgan"].parent / "eval.json").read_text())
    assert [r["name"] for r in beside["cas"]] == ["cgan (EMA)", "cgan (EMA), 5x real"]
    assert len(beside["augmentation"]) == 4
    assert beside["memorization"]["pixel"] == mem["pixel"]


def test_memorization_compares_with_the_subset_a_model_was_trained_on(data_root, feature_cache, tmp_path):
    import train_gan
    from conftest import TINY_GAN
    train_gan.main(["--data-root", str(data_root), "--device", "cpu", "--epochs", "1", *TINY_GAN,
                    "--subset", "16", "--out", str(tmp_path / "small")])
    out = tmp_path / "r.json"
    evaluate.main(["--device", "cpu", "--data-root", str(data_root), "--feature-cache", str(feature_cache),
                   "--kid-subsets", "2", "--kid-subset-size", "8", "--n", "16", "--no-reference",
                   str(tmp_path / "small" / "ckpt.pt"), "--memorization", "--json", str(out)])
    assert json.loads(out.read_text())["memorization"][0]["train_images"] == 16


def test_cas_alone_trains_no_augmentation_classifiers(ckpts, data_root, feature_cache, tmp_path, capsys):
    out = tmp_path / "r.json"
    evaluate.main(["--device", "cpu", "--data-root", str(data_root), "--feature-cache", str(feature_cache),
                   "--kid-subsets", "2", "--kid-subset-size", "8", "--n", "24", "--no-reference",
                   str(ckpts["cgan"]), "--cas", "--cas-sizes", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "CAS: training 1 classifier of" in printed and "Augmentation" not in printed
    results = json.loads(out.read_text())
    assert "augmentation" not in results  # nor the noise floor, with --no-reference
    assert [(r["name"], r["images"]) for r in results["cas"]] == [("real train split (ceiling)", 64),
                                                                  ("cgan (EMA), 2x real", 128)]
    assert len(results["cas"][1]["recall"]) == NUM_CLASSES  # per-class recall in the table


def test_utility_refuses_an_unconditional_checkpoint_in_one_line(ckpts):
    r = run_script("evaluate.py", ckpts["gan"], "--utility")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: --utility needs images that come with their class: {ckpts['gan']} was trained without "
        "--conditional (a VAE's --prior classes also draws by class); train one with --conditional"]


@pytest.mark.parametrize("bad", ["0,0.5", "0.1,x", "1.5"])
def test_bad_fractions_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["ckpt.pt", "--fractions", bad])
    assert "--fractions" in capsys.readouterr().err
