"""Score checkpoints of train_gan.py and train_vae.py against the test split of their dataset.

    python evaluate.py outputs/gan/ckpt.pt outputs/vae/ckpt.pt
    python evaluate.py outputs/cgan/ckpt.pt --n 2000 --json results.json
    python evaluate.py outputs/vae/ckpt.pt --split val --temperature 1.4   # choosing a setting

For each checkpoint it draws --n images and reports, in the feature space of a classifier trained
here on the checkpoint's dataset and size (evaluation/features.py; once per data file, then cached):
FID, KID (mean and std over subsets), precision and recall (k = 3), the generated images' class
shares under the classifier against the real ones (for the multi-label chestmnist, the share of
images showing each finding), and for conditional models how often the
classifier finds the class that was asked for. Beside them a measure that needs no training:
the sliced Wasserstein distance between the images' 7x7 patches and the real ones' at each scale
of a Laplacian pyramid (SWD, finest first: texture, then layout and colour; evaluation/patches.py),
which sees what a classifier of the classes may not (stain, light, background). VAEs also get test-split negative ELBO,
reconstruction MSE, PSNR and SSIM, and how often the classifier finds each test image's class in
its reconstruction (recon acc: can the decoder draw the class at all?). Two reference rows place
the numbers: real training images (the best a model can do) and noise with the training images'
per-pixel mean and std (a trivial generator). Results go to a table, to eval.json beside each
checkpoint (eval_epoch_010.json beside ckpt_epoch_010.pt; a rescoring keeps the studies below of an
earlier scoring of the same checkpoint file and draws), and to --json.

--split val scores against the validation split instead, everything above and below alike, and
writes eval_val.json: a setting (a temperature, a density, an epoch) chosen by the test split's
scores has seen the test split, so choose on val, then report the choice's test scores.

Is the synthetic data useful? Is it private? (evaluation/studies.py; docs/evaluation.md)

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

from data import Batches, as_tensor, load, locate, md5
from evaluation import distances, features, patches, report, studies
from evaluation.reconstruction import evaluate
from models.vae import PRIORS, TEMPERATURES, VALUE_RANGE, VAE
from system import errors, files, hardware
from utils import cli, pictures
from utils.checkpoint import Trained, load_trained
from utils.sampling import draw, fixed_noise, use_density


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
    p.add_argument("--misses", action="store_true",
                   help="draw misses_test.png beside each checkpoint: the real images furthest from every "
                        "sample in features (what recall misses), each above the sample nearest to it")
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


def score(images: torch.Tensor, feats: torch.Tensor, logits: torch.Tensor, real: dict, args,
          requested: torch.Tensor | None = None) -> dict:
    """Measures of uint8 images, with features.predict's features and logits of them, against the
    real split in `real` (its features, class shares and patches): in the feature space, and the
    training-free SWD of their patches per scale (evaluation/patches.py)."""
    multi_label = real["multi_label"]
    predicted = (logits > 0).long() if multi_label else logits.argmax(1)
    n = min(len(feats), len(real["features"]))  # precision/recall want equal set sizes
    precision, recall = distances.precision_recall(real["features"], feats[:n], k=3)
    kid, kid_std = distances.kid(feats, real["features"], args.kid_subsets, args.kid_subset_size, args.seed)
    shares = distances.class_shares(predicted, logits.shape[1])
    present = real["shares"] > 0  # a class missing from the real split has no ratio
    out = {"n": len(feats), "fid": distances.fid(feats, real["features"]), "kid": kid, "kid_std": kid_std,
           "precision": precision, "recall": recall, **real["patches"].scores(images.cpu()),
           "class_shares": shares.round(4).tolist(),
           # how far the class make-up is from the real split's: total variation (for findings, which
           # are not shares of one whole, the mean absolute difference), and the worst share ratio
           "class_tv": float(np.abs(shares - real["shares"]).mean() if multi_label
                             else 0.5 * np.abs(shares - real["shares"]).sum()),
           "min_share_ratio": float((shares[present] / real["shares"][present]).min())}
    if requested is not None:  # conditional: does the classifier see the class that was asked for?
        requested = requested.cpu()
        hit = predicted == requested
        per_class = features.per_class_rate(hit, requested, len(real["shares"]))
        out.update(class_accuracy=hit.double().mean().item(), class_accuracy_per_class=rounded(per_class))
    return out


def vae_measures(trained: Trained, test, args, fnet) -> dict:
    """Negative ELBO (nats per image) of the real split `test` (args.split names it), its parts,
    and the MSE, PSNR and SSIM of the mean reconstructions, as train_vae.py logs them for the
    validation split; keys named after the split (test_psnr, val_psnr). For a single-label
    set also how often the classifier sees each image's class in its reconstruction, overall and
    per class: whether the decoder can draw what marks a class at all, whatever density its
    samples come from."""
    batches = Batches(test, args.batch_size, trained.device, VALUE_RANGE, shuffle=False)
    kept = []  # the mean reconstructions the ELBO pass makes, with their labels
    measures = evaluate(trained.model, batches, args.seed, keep=kept)
    out = {args.split + k.removeprefix("val"): v for k, v in measures.items()}
    if test.multi_label:
        return out
    labels = torch.cat([y for _, y in kept])
    hit = features.predict(fnet, torch.cat([r for r, _ in kept]), args.batch_size)[1].argmax(1) == labels
    out["recon_class_accuracy"] = hit.double().mean().item()
    out["recon_class_accuracy_per_class"] = rounded(features.per_class_rate(hit, labels, test.num_classes))
    return out


def references(splits: dict, real: dict, fnet, args) -> list[dict]:
    """Real training images (what a perfect generator would score: only the sampling of two
    finite sets separates them from the real split) and independent per-pixel Gaussian noise
    with the training images' mean and std (a generator that learned only the palette)."""
    train = as_tensor(splits["train"].images)
    g = torch.Generator().manual_seed(args.seed)
    real_train = train[torch.randperm(len(train), generator=g)[:args.n]]
    noise = distances.pixel_noise(splits["train"].images, args.n, g)
    rows = []
    for name, images in (("real train images", real_train), ("pixel noise", noise)):
        feats, logits = features.predict(fnet, images, args.batch_size, desc="features")
        rows.append({"name": f"ref: {name}", **score(images, feats, logits, real, args)})
    return rows


def row_name(trained: Trained, args, taken: list[dict]) -> str:
    """The run folder's name (with a kept epoch's, as "run/ckpt_epoch_020"), and how it draws;
    a suffix where an earlier row already has the name."""
    path = trained.path
    name = path.parent.name or path.stem
    if path.name != "ckpt.pt" and path.parent.name:
        name += f"/{path.stem}"
    if trained.has_ema:
        name += " (EMA)" if trained.ema else " (raw G)"
    if getattr(trained.model, "density", None):
        name += f" ({trained.model.density} prior)"
    if temperature(trained, args) != trained.model.default_temperature:
        name += f" (T {temperature(trained, args):g})"
    return name + (f" [{len(taken) + 1}]" if any(r["name"] == name for r in taken) else "")


def temperature(trained: Trained, args) -> float:
    return trained.model.default_temperature if args.temperature is None else args.temperature


def generator(trained: Trained, name: str, args) -> studies.Generate:
    """A checkpoint as the studies' generator: labels, seed -> uint8 images."""
    def generate(labels: torch.Tensor, seed: int) -> torch.Tensor:
        noise = fixed_noise(len(labels), trained.model.latent_dim, seed, trained.device)
        return draw(trained.model, noise, labels, args.temperature, args.batch_size, uint8=True,
                    desc=f"{name}: generating")
    return generate


def load_all(args, device: torch.device) -> list[Trained]:
    """Every checkpoint's drawing network, checked before any work: one dataset and size for all,
    one data file (--data-root, else the one they were trained on), models that draw by class for
    the studies that need it, folders evaluate.py can write its eval files into."""
    models = [load_trained(path, device, not args.no_ema) for path in args.checkpoints]  # bad paths fail first
    for trained in models:
        use_density(trained.model, args.prior)
    datasets, roots = {t.data for t in models}, {t.settings["data_root"] for t in models}
    if len(datasets) > 1:
        raise errors.UserError(f"{', '.join(args.checkpoints)} were trained on different datasets or sizes "
                               f"({', '.join(sorted(map(str, datasets)))}); score each on its own")
    if args.data_root is None and len(roots) > 1:
        raise errors.UserError(f"{', '.join(args.checkpoints)} were trained on different data ({', '.join(sorted(roots))}); "
                               "pass --data-root to score them against one test split")
    args.data_root = args.data_root or roots.pop()
    study = "--utility" if args.utility else "--cas" if args.cas else None
    if study and models[0].data.multi_label:
        raise errors.UserError(f"{study}: {models[0].data.name} is multi-label, and its models (unconditional) do not "
                               "draw the findings of each image that a classifier would learn from")
    if study and (unlabelled := [t.path for t in models if not t.model.draws_classes]):
        raise errors.UserError(f"{study} needs images that come with their class: {unlabelled[0]} was trained "
                               "without --conditional (a VAE's --prior classes also draws by class); train one "
                               "with --conditional")
    if args.json:
        files.check_output(args.json, "--json", (".json",), args.overwrite)
    for path in args.checkpoints:
        files.check_folder(Path(path).parent, "the folder of", "evaluate.py writes eval.json beside each "
                           "checkpoint; copy the run to a folder you can write")
    return models


def score_checkpoint(trained: Trained, name: str, labels, real: dict, held, fnet, args) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The row of one checkpoint: --n images drawn, scored against the real split; with them, for
    the studies, the images (uint8) and their features."""
    t0 = time.time()
    noise = fixed_noise(args.n, trained.model.latent_dim, args.seed, trained.device)
    images = draw(trained.model, noise, labels, args.temperature, args.batch_size, uint8=True, desc=f"{name}: generating")
    feats, logits = features.predict(fnet, images, args.batch_size, desc="features")
    row = {"name": name, "checkpoint": str(trained.path), "checkpoint_md5": md5(trained.path), "kind": trained.kind, "conditional": trained.conditional,
           "epochs": trained.epochs, "ema": trained.ema, "prior": getattr(trained.model, "density", None),
           "temperature": temperature(trained, args), "split": args.split, **score(images, feats, logits, real, args, labels)}
    if isinstance(trained.model, VAE):
        row.update(vae_measures(trained, held, args, fnet))
    if args.misses:  # the real images no sample comes near, each above the sample nearest to it
        margins, nearest = distances.recall_misses(real["features"], feats[:len(real["features"])])
        picture, labels = studies.misses_picture(real["images"], images, margins, nearest)
        row["misses_png"] = str(report.beside(trained.path, f"misses_{args.split}.png"))
        pictures.save_grid(picture, Path(row["misses_png"]), nrow=len(picture) // len(labels), row_labels=labels)
    row["seconds"] = round(time.time() - t0, 1)
    print(f"{name}: FID {row['fid']:.2f}, KID {row['kid']:.2e} ({row['seconds']} s)")
    return row, images, feats


def main(argv=None):
    args = parse_args(argv)
    device = hardware.pick_device(args.device)
    hardware.speed_up(device)
    models = load_all(args, device)
    data = models[0].data
    splits = load(data, args.data_root)  # checked before the feature network takes its minutes
    held = splits[args.split]  # the real images everything is scored against
    if len(held) < 4:
        raise errors.UserError(f"the {args.split} split of {args.data_root} has {len(held)} images; "
                               "scoring needs at least 4")
    real_path = locate(data, args.data_root, download=False)
    real_file = [t.real_data(real_path) for t in models][0]  # each says if it trained on other data
    fnet, info = features.feature_network(data, args.data_root, device, args.feature_cache)
    held_feats = features.predict(fnet, held.images, args.batch_size, desc=f"{args.split} split")[0]
    real = {"features": held_feats, "shares": distances.class_shares(held.labels, data.num_classes),
            "multi_label": data.multi_label, "images": as_tensor(held.images)}
    real["patches"] = patches.Reference(real["images"], args.seed)
    train_shares = distances.class_shares(splits["train"].labels, data.num_classes)
    print(f"Feature network: {info['file']} (test accuracy {features.percent(info['test_accuracy'])}); "
          f"scored against {len(held):,} {args.split} images; {args.n:,} generated images per checkpoint")

    rows, records, memorization_rows, train_features = [], {}, [], {}
    for trained in models:
        labels = distances.proportional_labels(args.n, train_shares, args.seed).to(device) \
            if trained.model.draws_classes else None
        name = row_name(trained, args, rows)
        row, images, feats = score_checkpoint(trained, name, labels, real, held, fnet, args)
        rows.append(row)
        records[trained] = {"feature_network": info, "seed": args.seed, "real_data": real_file, **row}
        if args.memorization:
            memorization_rows.append(studies.memorization_row(name, trained, images, feats, splits, real, fnet, args,
                                                                   train_features))
            records[trained]["memorization"] = memorization_rows[-1]
    if not args.no_reference:
        rows += references(splits, real, fnet, args)
    print()
    report.print_table(rows, real["shares"], data.class_names, data.multi_label, args.split)
    out = {"dataset": data.name, "size": data.size, "real_data": real_file, "feature_network": info, "n": args.n, "seed": args.seed,
           "split": args.split, f"{args.split}_shares": real["shares"].tolist(), "results": rows}
    if args.memorization:
        report.print_memorization(memorization_rows, args.split)
        out["memorization"] = memorization_rows
    if args.cas or args.utility:
        out.update(run_studies(models, rows, records, splits, held, fnet, args, device))
    for trained, record in records.items():
        report.write_eval_json(trained.path, record, args.split)
    if args.json:
        note = files.write_output_text(args.json, json.dumps(out, indent=2) + "\n")
        print(f"\nWrote {args.json}{note}")


def run_studies(models: list[Trained], rows: list[dict], records: dict, splits: dict, held, fnet, args,
                device: torch.device) -> dict:
    """--cas and --utility: classifiers trained on each checkpoint's images, tested on the real
    split; each checkpoint's rows also go into its eval record."""
    names = [r["name"] for r in rows[:len(models)]]
    generators = {name: generator(t, name, args) for name, t in zip(names, models)}
    runs = args.fractions, range(args.seed, args.seed + args.seeds)
    floor = not args.no_reference
    total = floor + len(generators) * len(args.cas_sizes)
    total += len(runs[0]) * len(runs[1]) * (1 + len(generators)) if args.utility else 0
    print(f"\n{'Utility' if args.utility else 'CAS'}: training {total} classifier{'s' * (total != 1)} of "
          f"{studies.recipe_steps(len(splits['train'])):,} steps each")
    out = {}
    with tqdm(total=total, desc=f"{'utility' if args.utility else 'cas'}: classifiers", dynamic_ncols=True) as bar:
        out["cas"] = studies.cas(generators, splits["train"], held, device, args.seed, fnet, bar, args.cas_sizes, floor,
                                 models[0].data.symmetries)
        report.print_cas(out["cas"], models[0].data.class_names, args.split)
        if args.utility:
            out["augmentation"] = studies.augmentation(generators, splits["train"], held, device, *runs,
                                                       args.synthetic_ratio, bar, models[0].data.symmetries)
    if args.utility:
        report.print_augmentation(out["augmentation"], args.split)
    for trained, name in zip(models, names):
        records[trained]["cas"] = [r for r in out["cas"] if r.get("generator") == name]
        if args.utility:
            records[trained]["augmentation"] = [r for r in out["augmentation"] if r["training_set"] in ("real only", name)]
    return out


if __name__ == "__main__":
    cli.run_main(main)
