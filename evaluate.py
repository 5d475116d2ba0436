"""Score checkpoints of train_gan.py and train_vae.py against the test split of their dataset.

    python evaluate.py outputs/gan/ckpt.pt outputs/vae/ckpt.pt
    python evaluate.py outputs/cgan/ckpt.pt --n 2000 --json results.json
    python evaluate.py outputs/vae/ckpt.pt --split val --temperature 1.4   # choosing a setting

For each checkpoint it draws --n images and reports, in the feature space of a classifier trained
here on the checkpoint's dataset and size (metrics.py; once per data file, then cached):
FID, KID (mean and std over subsets), precision and recall (k = 3), the generated images' class
shares under the classifier against the real ones (for the multi-label chestmnist, the share of
images showing each finding), and for conditional models how often the
classifier finds the class that was asked for. VAEs also get test-split negative ELBO,
reconstruction MSE, PSNR and SSIM, and how often the classifier finds each test image's class in
its reconstruction (recon acc: can the decoder draw the class at all?). Two reference rows place
the numbers: real training images (the best a model can do) and noise with the training images'
per-pixel mean and std (a trivial generator). Results go to a table, to eval.json beside each
checkpoint (eval_epoch_010.json beside ckpt_epoch_010.pt; a rescoring keeps the studies below of an
earlier scoring of the same checkpoint file and draws), and to --json.

--split val scores against the validation split instead, everything above and below alike, and
writes eval_val.json: a setting (a temperature, a density, an epoch) chosen by the test split's
scores has seen the test split, so choose on val, then report the choice's test scores.

Is the synthetic data useful? Is it private? (synthetic.py; docs/evaluation.md)

    python evaluate.py outputs/cgan/ckpt.pt --cas            # models that draw by class only
    python evaluate.py outputs/cgan/ckpt.pt --utility
    python evaluate.py outputs/gan/ckpt.pt --memorization

--cas trains the feature network's classifier on class-balanced synthetic sets of --cas-sizes
times the real train split's images (1 and 5) and tests it on the real test split (CAS), beside
the real-data ceiling (the feature network itself) and a noise floor: 1 + C * M classifiers for
C checkpoints and M sizes. --utility adds the augmentation study: stratified real subsets
(--fractions) alone and with synthetic images added (--synthetic-ratio), over --seeds seeds,
F * S * (1 + C) classifiers more for F fractions and S seeds. Each classifier takes as long as
the feature network's training (seconds on a GPU, many minutes on a CPU).
--memorization compares, for the --n generated images, the distance to the nearest training
image (in the classifier's feature space and in pixels) with that of the real test images, and
draws the closest pairs.
"""
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils import cli, errors, files, hardware, pictures
from evaluation import metrics, reconstruction, studies
from data import Batches, as_tensor, load, md5
from models.vae import PRIORS, TEMPERATURES, VALUE_RANGE
from utils.sampling import Sampler


def parse_args(argv=None):
    p = cli.make_parser(__doc__)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="ckpt.pt files of either training script")
    p.add_argument("--n", type=cli.int_at_least(4), default=10_000,
                   help="images generated per checkpoint (precision and recall need more than k = 3)")
    p.add_argument("--no-ema", action="store_true", help="score the raw generator of an --ema run")
    p.add_argument("--prior", choices=PRIORS, default=None,
                   help="VAE: sample z from a Gaussian per class in the training shares (classes; the default), "
                        "one Gaussian for all codes (gaussian; the default for a multi-label set) or the training "
                        "prior (standard); see sample.py")
    p.add_argument("--temperature", type=cli.positive_float, default=None, metavar="T",
                   help="scale of the noise each draw starts from (sample.py --temperature; default: "
                        f"{TEMPERATURES['classes']:g} for the VAE's classes density, else 1)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the real images everything is scored against: the test split (for results), or the "
                        "validation split (for choosing settings; writes eval_val.json)")
    p.add_argument("--no-reference", action="store_true", help="skip the real-data and noise reference rows")
    p.add_argument("--kid-subsets", type=cli.positive_int, default=100, metavar="N",
                   help="subsets KID is averaged over")
    p.add_argument("--kid-subset-size", type=cli.int_at_least(2), default=1000, metavar="N",
                   help="images per KID subset")
    p.add_argument("--json", metavar="FILE", default=None, help="also write every result to this .json file")
    p.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    p.add_argument("--feature-cache", default="outputs/features", metavar="DIR",
                   help="where the feature network is cached, keyed by the data file's MD5")
    p.add_argument("--seed", type=int, default=0, help="seeds the latents and the KID subsets")
    p.add_argument("--batch-size", type=cli.positive_int, default=250, metavar="N", help="images per forward pass")
    cli.add_device_and_data(p, data_root=None)
    study = p.add_argument_group("is the synthetic data useful? is it private?")
    study.add_argument("--utility", action="store_true",
                       help="train-on-synthetic scores (CAS) and augmentation gains; models that draw by class only "
                            "(conditional, or a VAE with --prior classes)")
    study.add_argument("--cas", action="store_true",
                       help="the train-on-synthetic scores alone, without the augmentation study: one classifier "
                            "per checkpoint and --cas-sizes entry, plus the noise floor unless --no-reference")
    study.add_argument("--cas-sizes", type=cli.number_list("multiples", "1,5", above=0), default="1,5", metavar="M,M,...",
                       help="--cas/--utility: synthetic training sets of M times the real train split's images")
    study.add_argument("--fractions", type=cli.number_list("fractions", "0.01,0.1,1", above=0, most=1), default="0.01,0.1,1", metavar="F,F,...",
                       help="--utility: shares of the real train split (stratified) to augment")
    study.add_argument("--seeds", type=cli.positive_int, default=3, metavar="N",
                       help="--utility: seeds (subset, classifier, synthetic draw) per augmentation row")
    study.add_argument("--synthetic-ratio", type=cli.positive_float, default=1.0, metavar="R",
                       help="--utility: synthetic images added per real image of each class")
    study.add_argument("--memorization", action="store_true",
                       help="distance of the --n generated images to their nearest training image, "
                            "against real held-out (--split) images'; writes memorization_pairs.png beside the checkpoint")
    return p.parse_args(argv)


def rounded(rates: list[float | None]) -> list[float | None]:
    """Rates to 4 decimals for the JSON; a class with no items keeps its None."""
    return [None if r is None else round(r, 4) for r in rates]


def score(feats: torch.Tensor, logits: torch.Tensor, real: dict, args, requested: torch.Tensor | None = None) -> dict:
    """Feature-space measures of images, given as metrics.predict's features and logits,
    against the real split in `real` (its features and class shares)."""
    multi_label = real["multi_label"]
    predicted = (logits > 0).long() if multi_label else logits.argmax(1)
    n = min(len(feats), len(real["features"]))  # precision/recall want equal set sizes
    precision, recall = metrics.precision_recall(real["features"], feats[:n], k=3)
    kid, kid_std = metrics.kid(feats, real["features"], args.kid_subsets, args.kid_subset_size, args.seed)
    shares = metrics.class_shares(predicted, logits.shape[1])
    present = real["shares"] > 0  # a class missing from the real split has no ratio
    out = {"n": len(feats), "fid": metrics.fid(feats, real["features"]), "kid": kid, "kid_std": kid_std,
           "precision": precision, "recall": recall, "class_shares": shares.round(4).tolist(),
           # how far the class make-up is from the real split's: total variation (for findings, which
           # are not shares of one whole, the mean absolute difference), and the worst share ratio
           "class_tv": float(np.abs(shares - real["shares"]).mean() if multi_label
                             else 0.5 * np.abs(shares - real["shares"]).sum()),
           "min_share_ratio": float((shares[present] / real["shares"][present]).min())}
    if requested is not None:  # conditional: does the classifier see the class that was asked for?
        requested = requested.cpu()
        hit = predicted == requested
        per_class = metrics.per_class_rate(hit, requested, len(real["shares"]))
        out.update(class_accuracy=hit.double().mean().item(), class_accuracy_per_class=rounded(per_class))
    return out


def vae_measures(sampler: Sampler, test, args, fnet) -> dict:
    """Negative ELBO (nats per image) of the real split `test` (args.split names it), its parts,
    and the MSE, PSNR and SSIM of the mean reconstructions, as train_vae.py logs them for the
    validation split; keys named after the split (test_psnr, val_psnr). For a single-label
    set also how often the classifier sees each image's class in its reconstruction, overall and
    per class: whether the decoder can draw what marks a class at all, whatever density its
    samples come from."""
    batches = Batches(test, args.batch_size, sampler.device, VALUE_RANGE, shuffle=False)
    kept = []  # the mean reconstructions the ELBO pass makes, with their labels
    measures = reconstruction.evaluate(sampler.model, batches, args.seed, keep=kept)
    out = {args.split + k.removeprefix("val"): v for k, v in measures.items()}
    if test.multi_label:
        return out
    labels = torch.cat([y for _, y in kept])
    hit = metrics.predict(fnet, torch.cat([r for r, _ in kept]), args.batch_size)[1].argmax(1) == labels
    out["recon_class_accuracy"] = hit.double().mean().item()
    out["recon_class_accuracy_per_class"] = rounded(metrics.per_class_rate(hit, labels, test.num_classes))
    return out


def references(splits: dict, real: dict, fnet, args) -> list[dict]:
    """Real training images (what a perfect generator would score: only the sampling of two
    finite sets separates them from the real split) and independent per-pixel Gaussian noise
    with the training images' mean and std (a generator that learned only the palette)."""
    train = as_tensor(splits["train"].images)
    g = torch.Generator().manual_seed(args.seed)
    real_train = train[torch.randperm(len(train), generator=g)[:args.n]]
    noise = metrics.pixel_noise(splits["train"].images, args.n, g)
    rows = []
    for name, images in (("real train images", real_train), ("pixel noise", noise)):
        feats, logits = metrics.predict(fnet, images, args.batch_size, desc="features")
        rows.append({"name": f"ref: {name}", **score(feats, logits, real, args)})
    return rows


def row_name(path: str, sampler: Sampler) -> str:
    path = Path(path)
    name = path.parent.name or path.stem
    if path.name != "ckpt.pt" and path.parent.name:  # a kept epoch, ckpt_epoch_020.pt: "run/ckpt_epoch_020"
        name += f"/{path.stem}"
    if sampler.has_ema:
        name += " (EMA)" if sampler.ema else " (raw G)"
    if sampler.kind == "vae":
        name += f" ({sampler.prior} prior)"
    if sampler.temperature != sampler.default_temperature:
        name += f" (T {sampler.temperature:g})"
    return name


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
            ("recall", "recall", "{:.3f}"), ("class TV", "class_tv", "{:.3f}"), ("min share", "min_share_ratio", "{:.2f}"),
            ("cls acc", "class_accuracy", "{:.3f}"), ("recon acc", "recon_class_accuracy", "{:.3f}"),
            ("PSNR", f"{split}_psnr", "{:.2f}"), ("SSIM", f"{split}_ssim", "{:.3f}"), ("-ELBO", f"{split}_nelbo", "{:.1f}")]
    cols = [c for c in cols if any(c[1] in r for r in rows)]
    cell = lambda r, key, fmt: ("-" if key not in r else f"{r['kid']:.3f} ± {r['kid_std']:.3f}"
                                if key == "kid" else fmt.format(r[key]))
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


def generator(sampler: Sampler, name: str, batch_size: int) -> studies.Generate:
    """A checkpoint as synthetic.py's generator: labels, seed -> uint8 images."""
    def generate(labels: torch.Tensor, seed: int) -> torch.Tensor:
        return sampler.decode(sampler.latents(len(labels), seed, labels), labels, batch_size, uint8=True,
                              desc=f"{name}: generating")
    return generate


def memorization(name: str, path: str, sampler: Sampler, images: torch.Tensor, feats: torch.Tensor,
                 splits: dict, real: dict, fnet, args, train_features: dict) -> dict:
    """synthetic.memorization against the images this checkpoint was trained on (the first
    --subset of the train split, if it was trained on a subset; their features are computed
    once per subset), and the pairs picture. The scored split (--split) is the held-out set."""
    subset = sampler.args.get("subset")
    train, heldout = as_tensor(splits["train"].images[:subset]), as_tensor(splits[args.split].images)
    if subset not in train_features:
        train_features[subset] = metrics.predict(fnet, train, args.batch_size, desc="features: training images")[0]
    summary, pairs = studies.memorization(
        {"generated": images, "train": train, "heldout": heldout},
        {"generated": feats, "train": train_features[subset], "heldout": real["features"]}, sampler.device)
    picture, labels = studies.pairs_picture(images, train, heldout, pairs)
    out = beside(path, "memorization_pairs.png" if args.split == "test" else f"memorization_pairs_{args.split}.png")
    pictures.save_grid(picture, out, nrow=len(picture) // len(labels), row_labels=labels)
    return {"name": name, "checkpoint": str(path), "n_generated": len(images), "n_heldout": len(heldout),
            "train_images": len(train), **summary, "pairs_png": str(out)}


def main(argv=None):
    args = parse_args(argv)
    device = hardware.pick_device(args.device)
    hardware.speed_up(device)
    samplers = [Sampler(path, device, not args.no_ema, args.prior, args.temperature)
                for path in args.checkpoints]  # bad paths fail first
    study = "--utility" if args.utility else "--cas" if args.cas else None
    data = dataset_of_all(args.checkpoints, samplers)
    if study and data.multi_label:
        raise errors.UserError(f"{study}: {data.name} is multi-label, and its models (unconditional) do not draw "
                               "the findings of each image that a classifier would learn from")
    if study and (unlabelled := [p for p, s in zip(args.checkpoints, samplers) if not s.labelled]):
        raise errors.UserError(f"{study} needs images that come with their class: {unlabelled[0]} was trained "
                               "without --conditional (a VAE's --prior classes also draws by class); train one "
                               "with --conditional")
    args.data_root = args.data_root or data_root_of(args.checkpoints, samplers)
    if args.json:
        files.check_output(args.json, "--json", (".json",), args.overwrite)
    for path in args.checkpoints:
        files.check_folder(Path(path).parent, "the folder of", "evaluate.py writes eval.json beside each "
                           "checkpoint; copy the run to a folder you can write")
    splits = load(data, args.data_root)  # checked before the feature network takes its minutes
    held = splits[args.split]  # the real images everything is scored against
    if len(held) < 4:
        raise errors.UserError(f"the {args.split} split of {args.data_root} has {len(held)} images; "
                               "scoring needs at least 4")
    fnet, info = metrics.feature_network(data, args.data_root, device, args.feature_cache)
    held_feats = metrics.predict(fnet, held.images, args.batch_size, desc=f"{args.split} split")[0]
    real = {"features": held_feats, "shares": metrics.class_shares(held.labels, data.num_classes),
            "multi_label": data.multi_label}
    train_shares = metrics.class_shares(splits["train"].labels, data.num_classes)
    print(f"Feature network: {info['file']} (test accuracy {metrics.percent(info['test_accuracy'])}); "
          f"scored against {len(held):,} {args.split} images; {args.n:,} generated images per checkpoint")

    rows, eval_records, memorization_rows, train_features = [], {}, [], {}
    for path, sampler in zip(args.checkpoints, samplers):
        t0 = time.time()
        labels = metrics.proportional_labels(args.n, train_shares, args.seed).to(device) if sampler.labelled else None
        name = row_name(path, sampler)
        if any(r["name"] == name for r in rows):  # two run folders of one name: rows must differ
            name += f" [{len(rows) + 1}]"
        images = sampler.decode(sampler.latents(args.n, args.seed, labels), labels, args.batch_size, uint8=True,
                                desc=f"{name}: generating")
        feats, logits = metrics.predict(fnet, images, args.batch_size, desc="features")
        row = {"name": name, "checkpoint": str(path), "kind": sampler.kind,
               "conditional": sampler.conditional, "epochs": sampler.epochs_trained,
               "ema": sampler.ema, "prior": sampler.prior, "temperature": sampler.temperature,
               "split": args.split, **score(feats, logits, real, args, labels)}
        if sampler.kind == "vae":
            row.update(vae_measures(sampler, held, args, fnet))
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(f"{name}: FID {row['fid']:.2f}, KID {row['kid']:.2e} ({row['seconds']} s)")
        eval_records[path] = {"feature_network": info, "seed": args.seed, "checkpoint_md5": md5(Path(path)), **row}
        if args.memorization:
            memorization_rows.append(memorization(name, path, sampler, images, feats, splits, real, fnet, args, train_features))
            eval_records[path]["memorization"] = memorization_rows[-1]
        write_eval_json(path, eval_records[path], args.split)
    if not args.no_reference:
        rows += references(splits, real, fnet, args)
    print()
    print_table(rows, real["shares"], data.class_names, data.multi_label, args.split)
    out = {"dataset": data.name, "size": data.size, "feature_network": info, "n": args.n, "seed": args.seed,
           "split": args.split, f"{args.split}_shares": real["shares"].tolist(), "results": rows}

    if args.memorization:
        print_memorization(memorization_rows, args.split)
        out["memorization"] = memorization_rows
    if study:
        names = [r["name"] for r in rows[:len(samplers)]]
        generators = {name: generator(s, name, args.batch_size) for name, s in zip(names, samplers)}
        runs = args.fractions, range(args.seed, args.seed + args.seeds)
        floor = not args.no_reference
        total = floor + len(generators) * len(args.cas_sizes)
        total += len(runs[0]) * len(runs[1]) * (1 + len(generators)) if args.utility else 0
        print(f"\n{'Utility' if args.utility else 'CAS'}: training {total} classifier{'s' * (total != 1)} of "
              f"{studies.recipe_steps(len(splits['train'])):,} steps each")
        with tqdm(total=total, desc=f"{study[2:]}: classifiers", dynamic_ncols=True) as bar:
            out["cas"] = studies.cas(generators, splits["train"], held, device, args.seed, fnet, bar,
                                       args.cas_sizes, floor)
            print_cas(out["cas"], data.class_names, args.split)
            if args.utility:
                out["augmentation"] = studies.augmentation(generators, splits["train"], held, device,
                                                             *runs, args.synthetic_ratio, bar)
        if args.utility:
            print_augmentation(out["augmentation"], args.split)
        for path, name in zip(args.checkpoints, names):
            eval_records[path]["cas"] = [r for r in out["cas"] if r.get("generator") == name]
            if args.utility:
                eval_records[path]["augmentation"] = [r for r in out["augmentation"]
                                                      if r["training_set"] in ("real only", name)]
            write_eval_json(path, eval_records[path], args.split)
    if args.json:
        note = files.write_output_text(args.json, json.dumps(out, indent=2) + "\n")
        print(f"\nWrote {args.json}{note}")


def dataset_of_all(checkpoints: list[str], samplers: list[Sampler]):
    """The dataset and size the checkpoints were trained on, when they agree."""
    datasets = {s.data for s in samplers}
    if len(datasets) > 1:
        raise errors.UserError(f"{', '.join(checkpoints)} were trained on different datasets or sizes "
                               f"({', '.join(sorted(map(str, datasets)))}); score each on its own")
    return datasets.pop()


def data_root_of(checkpoints: list[str], samplers: list[Sampler]) -> str:
    """The data the checkpoints were trained on, when they agree (the scores need one test split)."""
    roots = {s.data_root for s in samplers}
    if len(roots) > 1:
        raise errors.UserError(f"{', '.join(checkpoints)} were trained on different data ({', '.join(sorted(roots))}); "
                               "pass --data-root to score them against one test split")
    return roots.pop()


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


if __name__ == "__main__":
    cli.run_main(main)
