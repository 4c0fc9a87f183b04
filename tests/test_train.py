"""train.py's optimizer and resumable state: fused AdamW against the unfused one, and state.pt's generators (saved as
tensors and plain data, restored per rank). Each runs on the CPU and, where there is one, on a GPU
(tests/gpu_check.sh runs the CUDA ones)."""
import random

import numpy as np
import pytest
import torch

import cli
import train
from test_precision import batch, tiny

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_takes_the_unfused_steps(device):
    """train.adamw (fused) and torch's default AdamW from the same weights, 10 steps on a tiny T5's loss with a
    learning rate that changes every step, as fit sets it: the same weights within float rounding (measured on the
    CPU: 2.4e-7 apart, after moving up to 0.056)."""
    ids, mask, labels = (t.to(device) for t in batch())
    fused, plain = tiny().to(device), tiny().to(device)
    optimizers = train.adamw(fused, 1e-2), torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.0)
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    start = [p.detach().clone() for p in plain.parameters()]
    for step in range(10):
        for model, optimizer in zip((fused, plain), optimizers):
            for group in optimizer.param_groups:
                group["lr"] = 1e-2 * (step + 1) / 10
            model(ids, mask, labels=labels)[1].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert max((b - s).abs().max().item() for b, s in zip(plain.parameters(), start)) > 0.01


def draws(device):
    """The next few numbers of every generator a run keeps: torch's CPU and device ones, Python's and numpy's."""
    return (torch.rand(3).tolist(), torch.rand(3, device=device).tolist(), random.random(),
            np.random.normal(size=3).tolist())


def seeded(seed, device):
    """rng_state after seeding every generator with `seed` (and one numpy normal, so a Gaussian is cached)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    np.random.normal()
    return train.rng_state(torch.device(device))


@pytest.mark.parametrize("device", DEVICES)
def test_state_pt_brings_back_each_ranks_generators(device, tmp_path, capsys):
    """save_state then load_state (torch.load with weights_only=True): a rank draws on as it would have after the
    save. Saved by two ranks: rank 1 takes rank 1's generators; resumed on three, rank 2 takes rank 0's (r mod 2),
    and rank 0 says so in one line."""
    model = tiny().to(device)
    optimizer, scaler = train.adamw(model, 1e-3), torch.amp.GradScaler(device, enabled=True)
    path, cpu_or_gpu = tmp_path / "state.pt", torch.device(device)
    ranks = [seeded(0, device), seeded(1, device)]
    expected = []
    for state in ranks:
        train.set_rng_state(state, cpu_or_gpu)
        expected.append(draws(device))
    assert expected[0] != expected[1]
    train.save_state(path, model, optimizer, scaler, ranks, 7, 50.0)
    for rank, world_size, saved_rank in ((1, 2, 1), (0, 2, 0), (2, 3, 0)):
        draws(device)  # the generators move on before the resume
        runtime = cli.Runtime(cpu_or_gpu, None, rank, world_size)
        assert train.load_state(path, model, optimizer, scaler, runtime) == (7, 50.0)
        assert draws(device) == expected[saved_rank], (rank, world_size)
    assert capsys.readouterr().out == ""  # rank 0 alone speaks, and only on another number of processes
    train.load_state(path, model, optimizer, scaler, cli.Runtime(cpu_or_gpu, None, 0, 3))
    assert "saved by 2 processes, resumed on 3" in capsys.readouterr().out
