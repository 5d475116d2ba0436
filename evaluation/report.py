"""What evaluate.py writes: the tables it prints, and the eval file beside each checkpoint
(eval.json, with its studies kept across quick rescorings)."""
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from system import files


def print_aligned(table: list[list[str]], left: int = 1, write=print) -> None:
    """A header line, a rule, then the rows; the first `left` columns flush left."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for i, line in enumerate(table):
        write("  ".join(v.ljust(w) if j < left else v.rjust(w) for j, (v, w) in enumerate(zip(line, widths))))
        if i == 0:
            write("  ".join("-" * w for w in widths))


def print_table(rows: list[dict], real_shares: np.ndarray, class_names: list[str], multi_label: bool,
                split: str = "test") -> None:
    cols = [("FID", "fid", "{:.2f}"), ("KID", "kid", None), ("prec", "precision", "{:.3f}"),
            ("recall", "recall", "{:.3f}"), ("SWD fine..coarse", "swd", None), ("class TV", "class_tv", "{:.3f}"), ("min share", "min_share_ratio", "{:.2f}"),
            ("cls acc", "class_accuracy", "{:.3f}"), ("recon acc", "recon_class_accuracy", "{:.3f}"),
            ("PSNR", f"{split}_psnr", "{:.2f}"), ("SSIM", f"{split}_ssim", "{:.3f}"), ("-ELBO", f"{split}_nelbo", "{:.1f}")]
    cols = [c for c in cols if any(c[1] in r for r in rows)]
    cell = lambda r, key, fmt: ("-" if key not in r else f"{r['kid']:.3f} ± {r['kid_std']:.3f}" if key == "kid"
                                else " ".join(f"{v:.1f}" for v in r[key]) if key == "swd" else fmt.format(r[key]))
    print_aligned([["model"] + [c[0] for c in cols]] + [[r["name"]] + [cell(r, k, f) for _, k, f in cols] for r in rows])
    print("\n" + ("Share of images showing each finding" if multi_label else "Class shares")
          + f" under the classifier ({split} split: true labels)")
    heads = [split] + [r["name"].removeprefix("ref: ")[:30] for r in rows]
    shares = [real_shares] + [r["class_shares"] for r in rows]
    w = [max(6, len(h)) for h in heads]
    print("class".ljust(14) + "".join(h.rjust(wi + 2) for h, wi in zip(heads, w)))
    for c, name in enumerate(class_names):
        print(name[:14].ljust(14) + "".join(f"{s[c]:{wi + 2}.3f}" for s, wi in zip(shares, w)))


def print_cas(cas: list[dict], class_names: list[str], split: str = "test") -> None:
    short = [name[:5] for name in class_names]
    tqdm.write(f"\nTrain on synthetic, test on real (CAS): the classifier's scores on the real {split} split")
    print_aligned([["training set", "images", "acc", "bal acc", "AUC", *[f"{n} rec" for n in short]]] + [
        [r["name"], f"{r['images']:,}", f"{r['accuracy']:.3f}", f"{r['balanced_accuracy']:.3f}", f"{r['auc']:.3f}",
         *["-" if v is None else f"{v:.2f}" for v in r["recall"]]] for r in cas], write=tqdm.write)


def print_augmentation(augmentation: list[dict], split: str = "test") -> None:
    print(f"\nAugmentation: {split} accuracy, mean ± std over seeds (per seed in brackets); gain over the "
          "real subset alone, seed by seed")
    print_aligned([["real share", "training set", "real", "synthetic", "accuracy", "per seed", "bal acc", "gain"]] + [
        [f"{r['fraction']:.0%}", r["training_set"], f"{r['real_images']:,}", f"{r['synthetic_images']:,}",
         f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}", "[" + " ".join(f"{a:.3f}" for a in r["accuracy"]) + "]",
         f"{r['balanced_accuracy_mean']:.3f} ± {r['balanced_accuracy_std']:.3f}",
         f"{r['gain_mean']:+.3f} ± {r['gain_std']:.3f}" if "gain" in r else "-"] for r in augmentation], left=2)


def print_memorization(rows: list[dict], split: str = "test") -> None:
    print(f"\nMemorisation: distance to the nearest training image, generated against held-out ({split}) images")
    print_aligned([["model", "space", "train images", "median gen", "median held-out", "ratio", "gen < held-out p5"]] + [
        [r["name"], space, f"{r['train_images']:,}", *[f"{r[space][key]:.3f}" for key in (
            "median_generated", "median_heldout", "median_ratio", "share_below_heldout_p5")]]
        for r in rows for space in ("feature", "pixel")], left=2)
    print("ratio about 1 or above: no sign of copying; near 0: the generator reproduces its training images. "
          "Held-out images fall below their own 5th percentile 5 % of the time.")


def beside(path: str, name: str) -> Path:
    """Where an output of one checkpoint goes, beside it and named after it: for "eval.json",
    ckpt.pt gives eval.json, ckpt_epoch_010.pt eval_epoch_010.json, best.pt eval_best.json. One
    file per checkpoint, so that scoring a run's kept epochs in one command keeps every epoch's."""
    stem = Path(path).stem
    suffix = stem.removeprefix("ckpt")
    if suffix and not suffix.startswith("_"):  # not a ckpt.pt or ckpt_*.pt name
        suffix = "_" + stem
    base, ext = name.split(".", 1)
    return Path(path).parent / f"{base}{suffix}.{ext}"


STUDIES = ("cas", "augmentation", "memorization")  # the slow parts of a scoring
# what a study depends on: the checkpoint file, and what its images and features are drawn with
STUDY_INPUTS = ("checkpoint_md5", "feature_network", "seed", "ema", "prior", "temperature")


def write_eval_json(path: str, record: dict, split: str = "test") -> None:
    """The checkpoint's eval file for the split scored against (eval.json for the test split,
    eval_val.json for the validation split): its latest scoring. A study that this scoring did not run (CAS,
    augmentation, memorisation: up to hours of classifiers on a CPU) stays from the file's earlier
    scoring when that one scored the same checkpoint file (by MD5) with the same draws, and is
    listed in "kept_studies": a quick rescoring does not throw it away."""
    out = beside(path, "eval.json" if split == "test" else f"eval_{split}.json")
    earlier = read_eval_json(out)
    record = dict(record)
    if all(earlier.get(k) == record[k] for k in STUDY_INPUTS):
        kept = [k for k in STUDIES if k in earlier and k not in record]
        record.update({k: earlier[k] for k in kept})
        if kept:
            record["kept_studies"] = kept
    note = files.write_output_text(out, json.dumps(record, indent=2) + "\n")
    tqdm.write(f"Wrote {out}{note}" + (f"; kept its earlier {', '.join(record['kept_studies'])}"
                                        if "kept_studies" in record else ""))


def read_eval_json(path: Path) -> dict:
    """An eval file's record, or {} where there is none or it cannot be read as one."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
