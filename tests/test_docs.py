"""Every `python <script>.py ...` command in README.md and docs/ parses with that script's own
argument parser: a renamed flag or a removed choice fails here until the docs are mended. The
record of past experiments (docs/studies.md) names, for each, the commit its commands ran on
instead. Every relative link points to a file and heading that exist."""
import re
import shlex
from pathlib import Path

import pytest

import bench
import evaluate
import sample
import train_gan
import train_vae

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STUDIES = ROOT / "docs" / "studies.md"  # commands true at the commit each section names
PARSE = {"train_gan.py": lambda argv: train_gan.build_parser().parse_args(argv),
         "train_vae.py": lambda argv: train_vae.build_parser().parse_args(argv),
         "bench.py": lambda argv: bench.build_parser().parse_args(argv),
         "sample.py": sample.parse_args,
         "evaluate.py": evaluate.parse_args}
# A command runs to the end of its code span or line, a shell comment, a pipe or a redirection.
COMMAND = re.compile(r"(?:python|torchrun[^`\n]*?)\s+(\w+\.py)((?:[ \t]+(?:\\\n[ \t]*)?[^\s`|#;&>]+)*)")


def commands(text: str):
    """(script, argv) for every command in the text, lines continued with a backslash joined, and
    so are the lines of a code span that prose wraps (outside fenced blocks)."""
    parts = re.split(r"(```.*?```)", text, flags=re.S)
    text = "".join(p if p.startswith("```") else re.sub(r"`[^`]+`", lambda m: m.group(0).replace("\n", " "), p)
                   for p in parts)
    for m in COMMAND.finditer(text):
        if m.group(1) in PARSE:
            yield m.group(1), shlex.split(re.sub(r"\\\n[ \t]*", " ", m.group(2)))


def all_commands():
    found = []
    for page in PAGES:
        if page == STUDIES:
            continue
        for script, argv in commands(page.read_text()):
            found.append(pytest.param(script, argv, id=f"{page.name}: {script} {' '.join(argv)}"[:120]))
    return found


def test_the_pages_hold_commands_of_every_script():
    scripts = {p.values[0] for p in all_commands()}
    assert scripts == set(PARSE)


def test_the_pattern_finds_flags_and_stops_at_the_end_of_a_command():
    text = ("run `python train_gan.py --epochs 2\n--out outputs/x` then\n"
            "python sample.py outputs/x/ckpt.pt --n 8  # a grid\n"
            "torchrun --nproc_per_node 2 train_vae.py --batch-size 64 \\\n    --epochs 1 > log.txt\n")
    assert list(commands(text)) == [("train_gan.py", ["--epochs", "2", "--out", "outputs/x"]),
                                    ("sample.py", ["outputs/x/ckpt.pt", "--n", "8"]),
                                    ("train_vae.py", ["--batch-size", "64", "--epochs", "1"])]


def test_a_removed_flag_is_caught(capsys):
    (script, argv), = commands("`python train_gan.py --no-such-flag 3`")
    with pytest.raises(SystemExit):
        PARSE[script](argv)
    assert "--no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("script,argv", all_commands())
def test_every_documented_command_parses(script, argv):
    try:
        PARSE[script](argv)
    except SystemExit as e:
        pytest.fail(f"{script} {' '.join(argv)}: the parser refused it (exit {e.code})")


def test_every_study_names_the_commit_it_ran_on():
    sections = re.split(r"^#{2,4} .+$", STUDIES.read_text(), flags=re.M)[1:]
    assert len(sections) > 10
    for text in sections:
        assert re.search(r"Recorded at commit `[0-9a-f]{7,40}`", text), text[:200]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_slug_matches_githubs_anchors():
    assert slug("The GAN's recipes: `--recipe small-data` (the default) and `--recipe paper`") == \
        "the-gans-recipes---recipe-small-data-the-default-and---recipe-paper"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target} names no file"
        if anchor and file.suffix == ".md":
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)}
            assert anchor in anchors, f"{page.name}: {target} names no heading of {file.name}"
