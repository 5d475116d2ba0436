"""The command line every script shares: its flags and their types, and run_main, which turns
what a user can fix into one `error: ...` line."""
import argparse
import math
import sys
import time

import torch

from system import distributed, errors, files, hardware


def run_main(main) -> None:
    """Call main(); a UserError becomes `error: ...` on stderr and exit status 1, and so does an
    operating-system error on a file (a read-only folder, a full disk): both name what to fix, and
    a traceback would only hide that. A training run stopped by Ctrl-C (Interrupted, once main has
    saved it) exits with status 130. Under torchrun every process meets the same error, and the
    first process of each machine reports it."""
    try:
        main()
        distributed.barrier()  # under torchrun, all leave together: no process tears down while others still talk
    except (errors.UserError, OSError) as e:
        if distributed.local_rank() != 0:
            # The first process meets the same error and reports it; when it exits, torchrun ends
            # this one. An error this process alone met is reported after the wait.
            time.sleep(30)
        print(f"error: {e if isinstance(e, errors.UserError) else describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except errors.Interrupted as stop:  # Ctrl-C in a training loop: the script has saved the run
        distributed.barrier()  # no process exits (and gets its siblings killed by torchrun) before the file is written
        if distributed.is_main():
            print(stop, file=sys.stderr)
        sys.exit(130)  # the shell's convention for a run ended by Ctrl-C
    except KeyboardInterrupt:  # Ctrl-C outside a training loop, or a second one inside it
        if distributed.local_rank() == 0:
            print("\ninterrupted: every file is written whole or not at all, so nothing is left "
                  "half-written", file=sys.stderr)
        sys.exit(130)
    finally:
        files.release_folders()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def describe_os_error(e: OSError) -> str:
    """'cannot write out/ckpt.pt: permission denied; ...' from an OSError, in one line."""
    what = e.strerror.lower() if e.strerror else type(e).__name__
    where = f" {e.filename}" if e.filename else ""
    return f"{type(e).__name__} on{where}: {what}; check that the path exists, is writable and has free space"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows each default that a help text does not
    already state (switches and unset options have none to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """A bad flag is reported as every other mistake is: one `error: ...` line, exit status 1."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def make_parser(doc: str) -> argparse.ArgumentParser:
    return _Parser(description=doc, formatter_class=_HelpFormatter)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def int_at_least(low: int):
    """An argparse type: an integer >= low (a value below cannot work, e.g. KID needs 2 images)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
        return value
    parse.__name__ = f"integer >= {low}"  # how argparse names the type in its own errors
    return parse


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def number_list(what: str, example: str, above: float, most: float = float("inf")):
    """An argparse type: numbers separated by commas, each above `above` and at most `most`."""
    def parse(text: str) -> list[float]:
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} separated by commas, such as {example}; "
                                             f"got {text}") from None
        if not all(above < v <= most for v in values):
            bound = f"lie in ({above:g}, {most:g}]" if most < float("inf") else f"be above {above:g}"
            raise argparse.ArgumentTypeError(f"every one of the {what} must {bound}; got {text}")
        return values
    return parse


def add_common_args(p: argparse.ArgumentParser, kind: str, epochs: int, lr: float | None, batch_size: int | None,
                    lr_help: str = "Adam learning rate") -> None:
    """The flags both training scripts take; defaults are shown by --help (None: set later)."""
    add_dataset_args(p)
    p.add_argument("--epochs", type=positive_int, default=epochs, metavar="N",
                   help="passes over the training split")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="N",
                   help="images per step, over all processes under torchrun (each takes an equal share)")
    p.add_argument("--lr", type=positive_float, default=lr, help=lr_help)
    p.add_argument("--schedule", choices=["constant", "cosine"], default=None,
                   help="learning rate over the run: constant, or a cosine decay from --lr to 0 at --epochs "
                        "(the recipe's by default)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, noise and data order")
    add_device_and_data(p)
    p.add_argument("--subset", type=positive_int, default=None, metavar="N",
                   help="train on the first N training images only (a quick check)")
    p.add_argument("--conditional", action="store_true",
                   help="condition the model on the class (the cell type of BloodMNIST); grids then show one "
                        "class per row. Not for the multi-label chestmnist")
    p.add_argument("--eval-every", type=non_negative_int, default=0, metavar="K",
                   help="every K epochs and after the last, log the KID (in evaluate.py's feature network; "
                        "trained once if not cached) and the SWD of patches of --eval-n samples against the test "
                        "split; 0: off")
    p.add_argument("--eval-n", type=int_at_least(2), default=2000, metavar="N", help="samples per --eval-every score")
    p.add_argument("--feature-cache", default="outputs/features", metavar="DIR",
                   help="where evaluate.py's feature network is cached")
    add_speed_args(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"run folder: config, metrics, grids, curves, ckpt.pt (default: outputs/{kind} for "
                        f"BloodMNIST at 64, else outputs/{kind}_DATASET_SIZE)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its ckpt.pt, with that run's settings")
    p.add_argument("--keep-every", type=non_negative_int, default=0, metavar="K",
                   help="also keep the checkpoint of every K-th epoch as ckpt_epoch_NNN.pt (each resumes, samples "
                        "and scores like ckpt.pt); 0: only the latest")


def add_recipe_arg(p: argparse.ArgumentParser, recipes: dict[str, dict], conditional: dict[str, dict],
                   default: str) -> None:
    """--recipe NAME: the defaults of the settings each recipe names, with what --conditional
    changes in them, all shown by --help."""
    def settings(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items())
    flags = [f"--{key.replace('_', '-')}" for key in recipes[default]]
    p.add_argument("--recipe", choices=recipes, default=default,
                   help=f"the defaults of {', '.join(flags[:-1])} and {flags[-1]}: "
                        + "; ".join(f"{name}: {settings(r)}"
                                    + (f" ({settings(conditional[name])} with --conditional)" if conditional[name] else "")
                                    for name, r in recipes.items()))


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    """--dataset and --size: which MedMNIST file a run trains on (sample.py and evaluate.py read
    them from the checkpoint)."""
    from data import DATASETS, SIZES
    p.add_argument("--dataset", choices=DATASETS, default="bloodmnist", metavar="NAME",
                   help="a MedMNIST 2D dataset: " + ", ".join(DATASETS))
    p.add_argument("--size", type=int, choices=SIZES, default=64, help="image side in pixels, as MedMNIST ships it")


def add_device_and_data(p: argparse.ArgumentParser, data_root: str | None = "data") -> None:
    """--device and --data-root; data_root None: the one the checkpoint was trained on."""
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--data-root", default=data_root, metavar="PATH",
                   help="folder holding the dataset's npz (bloodmnist_64.npz; downloaded there if missing), "
                        "or the .npz itself"
                        + ("" if data_root else " (default: the one the checkpoint was trained on)"))


def given_flags(parser: argparse.ArgumentParser, argv=None) -> set[str]:
    """The options typed on the command line (as `dest` names), told apart from those left at
    their defaults even when a typed value equals the default: argparse fills in a default only
    where the namespace it is handed lacks the attribute."""
    unset = object()
    dests = vars(parser.parse_args(argv))
    typed = parser.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in dests}))
    return {k for k, v in vars(typed).items() if v is not unset}


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """How the training scripts and bench.py compute; none of these changes what a model learns
    beyond rounding (README, "Speed")."""
    p.add_argument("--precision", choices=hardware.PRECISIONS, default="auto",
                   help="autocast dtype of the forward passes (weights and optimiser stay fp32): auto is "
                        "bf16 where the hardware computes it natively (recent NVIDIA GPUs, CPUs with "
                        "AVX512-BF16 or AMX), else fp32; fp16 adds a gradient scaler")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="keep images and convolution weights in channels-last (NHWC) memory format")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the networks (pays on GPUs; docs/speed.md has CPU timings)")
