"""DDP over 2 processes == 1 process on the concatenated batch, through the real launcher setup."""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelcore_strategies.launchers import SubprocessLauncher
from torch import nn

GLOBAL_BATCH = 4


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    for m in model.modules():  # non-trivial fixed statistics, so eval-mode BN matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    # BN in eval mode: per-rank batch statistics would otherwise differ from the global ones
    # (SyncBatchNorm needs a GPU/XPU in torch 2.13).
    return model.train().apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randint(0, 5, (GLOBAL_BATCH,),
                                                                             generator=g)


def one_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    # lr and momentum/nesterov/weight decay as in the YOLOX recipe; SGD sees averaged grads.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    loss = nn.functional.cross_entropy(model(images), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()


def ddp_step_and_bn_sync(rank: int, world_size: int) -> dict | None:
    """Rank r trains on its half of the fixed batch, wrapped exactly like loop.fit wraps it."""
    from accelcore.training.loop import all_reduce_norm

    model = make_model()
    images, labels = make_batch()
    per = GLOBAL_BATCH // world_size
    shard = slice(rank * per, (rank + 1) * per)
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    one_step(ddp, images[shard], labels[shard])
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # The loop's BN sync before evaluation: rank-specific stats become their mean.
    bn = model[1]
    bn.running_mean.fill_(float(rank))
    all_reduce_norm(model, world_size)
    synced = bn.running_mean.clone()

    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, weights)
    return {"weights": gathered, "bn_mean": synced} if rank == 0 else None


def test_two_process_step_equals_one_process_on_concatenated_batch():
    reference = make_model()
    one_step(reference, *make_batch())
    expected = reference.state_dict()

    result = SubprocessLauncher(2).launch(ddp_step_and_bn_sync)
    untouched = make_model().state_dict()
    changed = [k for k in expected if "weight" in k and not torch.equal(expected[k], untouched[k])]
    assert changed  # the step did move the weights, so the comparison below means something
    for rank_weights in result["weights"]:
        assert rank_weights.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(rank_weights[key], value, rtol=1e-5, atol=1e-6,
                                       msg=f"{key} differs")
    torch.testing.assert_close(result["bn_mean"], torch.full((8,), 0.5))


def test_single_process_shard_differs_from_global_step():
    """Guard: training on half the batch alone gives other weights (the test above can fail)."""
    full, half = make_model(), make_model()
    images, labels = make_batch()
    one_step(full, images, labels)
    one_step(half, images[:2], labels[:2])
    assert not torch.allclose(full[0].weight, half[0].weight, atol=1e-6)
