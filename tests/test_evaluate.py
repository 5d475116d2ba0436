"""evaluate.py on tiny checkpoints of every kind (table, JSON, eval.json, reference rows, EMA
choice, conditional class accuracy, VAE measures; a perfect autoencoder's recon accuracy),
--eval-every in both training scripts, and the one-line refusals."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from system import errors
import evaluate
from evaluation import features, report
import train_gan
import train_vae
from conftest import TINY_GAN, TINY_VAE, run_script, write_npz
from data import Dataset, load
from models.vae import VAE


def run(data_root, cache, *argv):
    evaluate.main(["--device", "cpu", "--data-root", str(data_root), "--feature-cache", str(cache),
                   "--kid-subsets", "5", "--kid-subset-size", "12", *map(str, argv)])


def test_every_kind_of_checkpoint_is_scored(ckpts, data_root, feature_cache, tmp_path, capsys):
    out = tmp_path / "results.json"
    run(data_root, feature_cache, *ckpts.values(), "--n", 40, "--json", out)
    table = capsys.readouterr().out
    results = json.loads(out.read_text())
    rows = {r["name"]: r for r in results["results"]}
    assert list(rows) == ["cgan (EMA)", "gan", "vae (classes prior)", "cvae (classes prior)",
                          "ref: real train images", "ref: pixel noise"]
    for name, row in rows.items():
        assert name in table
        assert {"fid", "kid", "kid_std", "precision", "recall", "class_shares", "class_tv"} <= set(row)
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert sum(row["class_shares"]) == pytest.approx(1, abs=1e-3)
        assert row["n"] == 40
    for name in ("cgan (EMA)", "vae (classes prior)", "cvae (classes prior)"):  # models that draw by class
        assert len(rows[name]["class_accuracy_per_class"]) == 8
    assert "class_accuracy" not in rows["gan"]
    for name in ("vae (classes prior)", "cvae (classes prior)"):
        assert {"test_nelbo", "test_mse", "test_psnr", "test_ssim", "recon_class_accuracy"} <= set(rows[name])
        assert len(rows[name]["recon_class_accuracy_per_class"]) == 8
        assert "test_psnr" not in rows["gan"]
    # the real images sit far closer to the test split than noise does, in features and in patches
    assert rows["ref: real train images"]["fid"] < rows["ref: pixel noise"]["fid"]
    for name, row in rows.items():
        assert len(row["swd"]) == 3 and row["swd_mean"] == pytest.approx(sum(row["swd"]) / 3, abs=1e-3)
    assert all(a < b for a, b in zip(rows["ref: real train images"]["swd"], rows["ref: pixel noise"]["swd"]))
    assert results["feature_network"]["test_accuracy"] is not None
    beside = json.loads((ckpts["gan"].parent / "eval.json").read_text())
    assert beside["fid"] == rows["gan"]["fid"]


def test_recon_accuracy_of_a_perfect_autoencoder_is_the_classifiers_own(data_root, feature_cache):
    """A decoder that gives back every image exactly leaves the classifier seeing the test split
    itself: its recon acc is the feature network's test accuracy, per class as overall."""
    class Identity(VAE):
        """Codes are the pixels; the ELBO pass runs as for any VAE. Decoding scales by 1 - 1e-4, which
        rounding to uint8 undoes for every pixel, so PSNR stays finite."""
        def encode(self, x, y=None):
            return x.flatten(1), torch.zeros_like(x.flatten(1))

        def decode(self, z, y=None):
            return z.view(-1, 3, 64, 64) * (1 - 1e-4)

        def decode_logits(self, z, y=None):
            return torch.logit(self.decode(z), eps=1e-6)
    fnet, info = features.feature_network(Dataset(), data_root, torch.device("cpu"), str(feature_cache))
    test = load(Dataset(), data_root, splits=("test",))["test"]
    trained = SimpleNamespace(model=Identity(latent_dim=4, widths=(8,)), device=torch.device("cpu"))
    out = evaluate.vae_measures(trained, test, SimpleNamespace(batch_size=5, seed=0, split="test"), fnet)
    assert out["recon_class_accuracy"] == pytest.approx(info["test_accuracy"])
    hit = features.predict(fnet, test.images)[1].argmax(1).numpy() == test.labels
    assert out["recon_class_accuracy_per_class"] == [round(hit[test.labels == c].mean(), 4) if (test.labels == c).any()
                                                     else None for c in range(8)]


def test_no_ema_scores_the_raw_generator_and_no_reference_skips_rows(ckpts, data_root, feature_cache, tmp_path):
    for flag, name in (([], "cgan (EMA)"), (["--no-ema"], "cgan (raw G)")):
        run(data_root, feature_cache, ckpts["cgan"], "--n", 24, "--no-reference", "--json", tmp_path / "r.json", "--overwrite", *flag)
        rows = json.loads((tmp_path / "r.json").read_text())["results"]
        assert [r["name"] for r in rows] == [name]


def test_each_checkpoint_of_a_run_keeps_its_own_eval_file(ckpts, data_root, feature_cache, tmp_path):
    """A run's kept epochs scored in one command: each checkpoint's record and memorisation picture
    survive, named after it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("ckpt_epoch_005.pt", "ckpt.pt", "best.pt"):
        shutil.copy(ckpts["gan"], run_dir / name)
    paths = [run_dir / n for n in ("ckpt_epoch_005.pt", "ckpt.pt", "best.pt")]
    run(data_root, feature_cache, *paths, "--n", 24, "--no-reference", "--memorization")
    for path, suffix in zip(paths, ("_epoch_005", "", "_best")):
        assert report.beside(str(path), "eval.json") == run_dir / f"eval{suffix}.json"
        record = json.loads((run_dir / f"eval{suffix}.json").read_text())
        assert record["checkpoint"] == str(path)
        assert record["memorization"]["pairs_png"] == str(run_dir / f"memorization_pairs{suffix}.png")
        assert (run_dir / f"memorization_pairs{suffix}.png").is_file()


def test_a_rescoring_keeps_the_studies_of_the_same_checkpoint_and_draws(ckpts, data_root, feature_cache, tmp_path):
    """A quick scoring after a slow study keeps the study in eval.json, unless the checkpoint
    file or the draws changed, when the study no longer describes what was scored."""
    path = tmp_path / "ckpt.pt"
    shutil.copy(ckpts["gan"], path)
    record = lambda: json.loads((tmp_path / "eval.json").read_text())
    score = lambda *flags: run(data_root, feature_cache, path, "--n", 24, "--no-reference", *flags)
    score("--memorization")
    studied = record()
    assert "memorization" in studied and "kept_studies" not in studied
    score()
    assert record()["memorization"] == studied["memorization"] and record()["kept_studies"] == ["memorization"]
    assert record()["fid"] == studied["fid"]
    score()  # kept again from a file that had kept it
    assert record()["memorization"] == studied["memorization"]
    score("--seed", 1)  # other draws: the study was of other images
    assert "memorization" not in record() and "kept_studies" not in record()
    score("--memorization", "--no-ema")
    shutil.copy(ckpts["cgan"], path)  # another checkpoint under the same name, drawn the same way
    score("--no-ema")
    assert "memorization" not in record() and record()["checkpoint_md5"] != studied["checkpoint_md5"]


def test_split_val_is_the_test_scoring_of_the_validation_images(ckpts, data_root, feature_cache, tmp_path):
    """--split val gives the numbers that a test scoring gives on a file whose test split is this
    file's validation split (the same training images, so the same feature network), in
    eval_val.json, leaving eval.json to the test scoring."""
    with np.load(data_root / "bloodmnist_64.npz") as f:
        arrays = dict(f)
    swapped = write_npz(tmp_path / "swapped" / "bloodmnist_64.npz",
                        **{**arrays, "test_images": arrays["val_images"], "test_labels": arrays["val_labels"]}).parent
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "ckpt.pt"
    shutil.copy(ckpts["cvae"], path)
    read = lambda name: json.loads((run_dir / name).read_text())
    score = lambda root, *flags: run(root, feature_cache, path, "--n", 24, "--no-reference", "--memorization", *flags)
    score(data_root, "--split", "val")
    assert not (run_dir / "eval.json").exists() and (run_dir / "memorization_pairs_val.png").is_file()
    val = read("eval_val.json")
    score(swapped)
    swapped_test = read("eval.json")
    assert read("eval_val.json") == val
    assert val["split"] == "val" and swapped_test["split"] == "test"
    for key in ("fid", "kid", "precision", "recall", "class_shares", "class_accuracy", "recon_class_accuracy"):
        assert val[key] == pytest.approx(swapped_test[key])
    for key in ("nelbo", "psnr", "ssim"):
        assert val[f"val_{key}"] == pytest.approx(swapped_test[f"test_{key}"])
    assert val["memorization"]["feature"] == pytest.approx(swapped_test["memorization"]["feature"])
    assert "test_psnr" not in val
    score(data_root)  # the test split itself: other real images, other numbers
    assert read("eval.json")["fid"] != val["fid"] and read("eval_val.json") == val


def test_each_vae_prior_scores_its_own_draws(ckpts, data_root, feature_cache, tmp_path):
    rows = {}
    for flag in ([], ["--prior", "gaussian"], ["--prior", "standard"]):
        run(data_root, feature_cache, ckpts["vae"], "--n", 24, "--no-reference", "--json", tmp_path / "r.json", "--overwrite", *flag)
        row = json.loads((tmp_path / "r.json").read_text())["results"][0]
        rows[row["name"]] = row
    assert list(rows) == ["vae (classes prior)", "vae (gaussian prior)", "vae (standard prior)"]
    assert len({r["fid"] for r in rows.values()}) == 3
    # the class mixture draws by class, so its samples have a class accuracy; the others do not
    assert "class_accuracy" in rows["vae (classes prior)"] and "class_accuracy" not in rows["vae (standard prior)"]


def test_same_seed_same_numbers_at_any_batch_size(ckpts, data_root, feature_cache, tmp_path):
    scores = []
    for argv in ([], ["--batch-size", "7"], ["--seed", "1"]):
        run(data_root, feature_cache, ckpts["gan"], "--n", 24, "--no-reference", "--json", tmp_path / "r.json", "--overwrite", *argv)
        scores.append(json.loads((tmp_path / "r.json").read_text())["results"][0])
    assert scores[0]["fid"] == pytest.approx(scores[1]["fid"], rel=1e-6)  # eval-mode BN: batch-independent
    # KID is a small difference of large kernel means, so the rounding of another batch's
    # convolution path shows more in it than in the FID
    assert scores[0]["kid"] == pytest.approx(scores[1]["kid"], rel=1e-5)
    assert scores[2]["fid"] != scores[0]["fid"]  # other latents


def test_data_without_a_test_split_is_refused_in_one_line(ckpts, feature_cache, tmp_path):
    """An exported synthetic npz has empty val and test splits: nothing to score against."""
    synthetic = write_npz(tmp_path / "synthetic.npz", sizes=(64, 0, 0))
    with pytest.raises(errors.UserError, match="test split .* has 0 images"):
        run(synthetic, feature_cache, ckpts["gan"], "--n", 24)


def test_bad_checkpoint_is_one_line_error(tmp_path):
    r = run_script("evaluate.py", tmp_path / "missing.pt")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'missing.pt'} not found"]


@pytest.mark.parametrize("module,tiny", [(train_gan, TINY_GAN), (train_vae, TINY_VAE)])
def test_eval_every_logs_kid_and_swd(module, tiny, data_root, feature_cache, tmp_path):
    out = tmp_path / "run"
    module.main(["--data-root", str(data_root), "--device", "cpu", "--epochs", "3", *tiny, "--eval-every", "2",
                 "--eval-n", "24", "--feature-cache", str(feature_cache), "--out", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ["kid" in r for r in records] == [False, True, True]  # every 2nd epoch and the last
    assert all(r["kid_std"] >= 0 for r in records[1:])
    assert all(len(r["swd"]) == 3 and r["swd_mean"] > 0 for r in records[1:])
    assert (out / "curves.png").is_file()


def test_misses_shows_the_real_images_recall_misses(ckpts, data_root, feature_cache, tmp_path):
    from evaluation import distances
    run(data_root, feature_cache, ckpts["gan"], "--n", 40, "--misses", "--no-reference")
    record = json.loads((ckpts["gan"].parent / "eval.json").read_text())
    assert Path(record["misses_png"]).is_file() and Path(record["misses_png"]).name == "misses_test.png"
    # a margin above 0 is a miss: as many as recall says, for the same sets
    real, fake = torch.randn(60, 5), torch.randn(60, 5) + 1.5
    margins, nearest = distances.recall_misses(real, fake)
    assert (margins <= 0).double().mean().item() == pytest.approx(distances.precision_recall(real, fake)[1])
    assert torch.equal(nearest, torch.cdist(real, fake).sub(distances._knn_radii(fake, 3)).argmin(1))
