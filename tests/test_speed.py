"""The speed options: bench.py end to end, --precision (bf16, fp16 with its scalers in the
checkpoint), channels-last (same numbers as contiguous), --compile, fused Adam, and G's step
leaving D's gradients alone. No timing is asserted anywhere: bench.py is a benchmark."""
import json

import pytest
import torch

from system import hardware

from utils import checkpoint, log
import train_gan
import train_vae
from conftest import TINY_GAN, TINY_VAE, run_script
from data import Dataset
from models import vae
from models.dcgan import Discriminator, Generator, generator_loss


def test_bench_writes_a_row_per_workload(data_root, tmp_path):
    out = tmp_path / "bench.json"
    r = run_script("bench.py", "--data-root", data_root, "--workloads", "gan-wgan-gp", "vae-default", "features",
                   "--batch-size", 8, "--feature-batch-size", 16, "--steps", 1, "--repeats", 2, "--warmup", 1,
                   "--workers", 0, "--json", out)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert [row["workload"] for row in rows] == ["gan-wgan-gp", "vae-default", "features"]
    for row in rows:
        assert row["images_per_s"] > 0 and row["baseline_images_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["images_per_s"] / row["baseline_images_per_s"], rel=0.02)
        assert row["device"] and row["precision"] in ("fp32", "bf16")
    assert "speedup" in r.stdout and "vae" in r.stdout  # the table


def test_bench_rejects_batches_larger_than_the_data(data_root):
    r = run_script("bench.py", "--data-root", data_root, "--workloads", "vae", "--batch-size", 1000)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error:") and "--batch-size" in last


def test_precision_names_resolve_on_this_machine():
    cpu = torch.device("cpu")
    assert hardware.resolve_precision("fp32", cpu) == torch.float32
    assert hardware.resolve_precision("bf16", cpu) == torch.bfloat16
    assert hardware.resolve_precision("fp16", cpu) == torch.float16
    assert hardware.resolve_precision("auto", cpu) == (torch.bfloat16 if hardware.cpu_has_bf16() else torch.float32)
    assert hardware.Precision("fp16", cpu).scaler() is not None and hardware.Precision("bf16", cpu).scaler() is None


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gan_and_vae_train_in_reduced_precision(data_root, tmp_path, precision):
    common = ["--data-root", str(data_root), "--device", "cpu", "--epochs", "1", "--precision", precision]
    train_gan.main([*common, *TINY_GAN, "--loss", "wgan-gp", "--n-critic", "2", "--out", str(tmp_path / "gan")])
    train_vae.main([*common, *TINY_VAE, "--out", str(tmp_path / "vae")])
    for kind, scalers in (("gan", {"G", "D"}), ("vae", {"vae"})):
        ckpt = checkpoint.load_checkpoint(tmp_path / kind / "ckpt.pt", kind)
        assert set(ckpt["scalers"]) == (scalers if precision == "fp16" else set())
        record = json.loads((tmp_path / kind / "metrics.jsonl").read_text().splitlines()[-1])
        assert all(isinstance(v, (int, float)) and v == v for v in record.values())  # finite, no NaN
    # a checkpoint's scaler comes back on resume
    train_vae.main(["--resume", "--epochs", "2", "--out", str(tmp_path / "vae"), "--data-root", str(data_root), "--device", "cpu"])
    assert checkpoint.load_checkpoint(tmp_path / "vae" / "ckpt.pt", "vae")["epoch"] == 2


@pytest.mark.parametrize("module, extra", [(train_gan, TINY_GAN), (train_vae, TINY_VAE)])
def test_channels_last_learns_the_same_numbers(data_root, tmp_path, module, extra):
    """The memory format changes how convolutions walk memory, not what they compute."""
    common = ["--data-root", str(data_root), "--device", "cpu", "--epochs", "2", "--precision", "fp32", *extra]
    module.main([*common, "--out", str(tmp_path / "nhwc")])
    module.main([*common, "--no-channels-last", "--out", str(tmp_path / "nchw")])
    a, b = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("nhwc", "nchw"))
    for ra, rb in zip(a, b):
        for key in ra.keys() - {"seconds"}:
            assert ra[key] == pytest.approx(rb[key], rel=1e-3, abs=1e-4), key


def test_compiled_vae_trains_and_saves_plain_weights(data_root, tmp_path):
    pytest.importorskip("torch._inductor")
    train_vae.main(["--data-root", str(data_root), "--device", "cpu", "--epochs", "1", "--compile",
                    *TINY_VAE, "--out", str(tmp_path / "vae")])
    ckpt = checkpoint.load_checkpoint(tmp_path / "vae" / "ckpt.pt", "vae")
    assert not any(k.startswith("_orig_mod") for k in ckpt["models"]["vae"])  # loads into a plain VAE
    vae.build(ckpt["args"], Dataset())["vae"].load_state_dict(ckpt["models"]["vae"])


def test_generator_step_computes_no_discriminator_gradients():
    G, D = Generator(16, 8), Discriminator(8)
    opt = hardware.adam(G.parameters(), 1e-3)
    before = [p.detach().clone() for p in G.parameters()]
    hardware.backward_step(generator_loss("bce", D(G(torch.randn(4, 16)))), opt, inputs=list(G.parameters()))
    assert all(p.grad is None for p in D.parameters())
    assert all(p.grad is not None for p in G.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, G.parameters()))


def test_fused_adam_is_used_where_available_and_matches_plain_adam():
    torch.manual_seed(0)
    w = torch.randn(10, requires_grad=True)
    w2 = w.detach().clone().requires_grad_(True)
    fused, plain = hardware.adam([w], 1e-2), torch.optim.Adam([w2], lr=1e-2)
    for _ in range(5):
        for p, o in ((w, fused), (w2, plain)):
            o.zero_grad()
            (p ** 2).sum().backward()
            o.step()
    assert torch.allclose(w, w2, atol=1e-6)


def test_resume_keeps_this_machines_optimizer_flavour(tmp_path):
    """A checkpoint saved with fused Adam resumes with whatever this machine builds (and back)."""
    model = torch.nn.Linear(3, 1)
    plain = torch.optim.Adam(model.parameters(), lr=1e-3)
    saved = {"models": {"m": model.state_dict()}, "optimizers": {"m": {**plain.state_dict(), "param_groups": [
        {**g, "fused": True} for g in plain.state_dict()["param_groups"]]}},
        "meter": {"sums": {}, "counts": {}}, "rng": checkpoint.rng_state(torch.device("cpu")), "epoch": 1, "step": 0}
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)
    checkpoint.restore_training_state(saved, {"m": model}, {"m": fresh}, log.Meter(), torch.device("cpu"))
    assert not fresh.param_groups[0]["fused"]


def test_keep_freed_memory_can_be_called_twice():
    hardware.keep_freed_memory()
    hardware.keep_freed_memory()
    assert torch.ones(1 << 22).sum().item() == 1 << 22  # big blocks still allocate and free
