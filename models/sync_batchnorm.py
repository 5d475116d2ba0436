"""BatchNorm with its statistics taken over the global batch of all processes (--sync-bn).

Under torchrun each process normalises its own shard of the batch: with plain BatchNorm, N
processes each see batch/N images per statistic. This layer sums each channel's sum and sum of
squares over the processes first, so N processes normalise exactly as one process does with the
whole batch (Ioffe & Szegedy 2015, computed over the global batch as in Peng et al. 2018,
"MegDet"). It is written here, not taken from torch.nn.SyncBatchNorm, because that one runs on
GPUs only: this one runs, and is tested, on CPUs with gloo too.

Outside training it is an ordinary BatchNorm2d, with the same parameters and buffers, so its
checkpoints load into a plain model.
"""
import torch
import torch.distributed as dist
import torch.nn as nn


class _SumOverProcesses(torch.autograd.Function):
    """x summed over all processes. Every process's loss depends on the sum, so the gradient of
    each process's x is the sum of all processes' gradients of it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # the same sum, through this Function again: so the backward pass is differentiable in
        # its turn, as R1 and the gradient penalty need (they differentiate D's gradient)
        return _SumOverProcesses.apply(grad)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (with momentum running statistics) over the batches of all processes.

    In training it always computes its statistics itself, even in one process, so that one
    process with this layer reproduces N processes with it to float rounding (BatchNorm's
    backward pass magnifies the rounding differences between two ways of computing the same
    statistics). Each process's moments come from a two-pass var_mean; they are combined in
    float64, where sum(x^2) - n mean^2 loses nothing to cancellation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        c, m = x.shape[1], x.numel() // x.shape[1]  # m values per channel in this process
        xf = x.float()  # fp32 statistics whatever the autocast dtype
        var_here, mean_here = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        mean_here = mean_here.double()
        sums = torch.cat([mean_here, var_here.double() + mean_here.square()]) * m  # sum x, sum x^2
        n = m
        if dist.is_initialized() and dist.get_world_size() > 1:
            sums = _SumOverProcesses.apply(sums)  # (2C,): one all-reduce a layer
            n = m * dist.get_world_size()
        mean64 = sums[:c] / n
        var64 = (sums[c:] / n - mean64.square()).clamp_min(0)  # biased, as BatchNorm normalises with
        mean, var = mean64.float(), var64.float()
        with torch.no_grad():  # the running variance is the unbiased one, as in BatchNorm
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * (n / (n - 1)), self.momentum)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = self.weight * scale
        shift = (self.bias if self.affine else 0) - mean * scale
        return (xf * scale[:, None, None] + shift[:, None, None]).to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """module with every nn.BatchNorm2d replaced, in place, by a SyncBatchNorm2d holding the same
    weights and statistics."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, affine=child.affine)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync.to(child.running_mean.device))
        else:
            convert_sync_batchnorm(child)
    return module
