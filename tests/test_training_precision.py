"""Every precision plugin runs a real YOLOX training step with a finite loss."""

from __future__ import annotations

import pytest
import torch

from accelcore.config import TrainConfig
from accelcore.plugins import get_plugin_manager
from accelcore.training.ema import ModelEMA
from accelcore.training.optim import build_optimizer


def _batch(n: int = 2, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g) * 255
    targets = torch.zeros(n, 10, 5)
    targets[:, 0] = torch.tensor([1.0, 40.0, 50.0, 30.0, 20.0])
    targets[:, 1] = torch.tensor([2.0, 90.0, 80.0, 24.0, 40.0])
    return images, targets


def _step(precision_name: str, channels_last: bool = False, steps: int = 2):
    from accelcore import create_model

    torch.manual_seed(0)
    model = create_model("yolox_nano", num_classes=3)
    precision = get_plugin_manager().hook.accelcore_precision(name=precision_name)
    assert precision is not None and precision.name == precision_name
    model = precision.convert_module(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = build_optimizer(model, TrainConfig(), lr=0.01)
    ema = ModelEMA(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    images, targets = _batch()
    losses = []
    for _ in range(steps):
        x = precision.convert_input(images)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.forward_context():
            out = model(x, targets)
        opt.zero_grad(set_to_none=True)
        precision.backward(out["total_loss"])
        precision.optimizer_step(opt)
        ema.update(model)
        losses.append(out["total_loss"])
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items()
                  if v.dtype.is_floating_point and k.endswith("weight"))
    return model, precision, losses, changed


@pytest.mark.parametrize("name", ["64", "32", "16", "bf16"])
def test_precision_step(name: str):
    model, precision, losses, changed = _step(name)
    for loss in losses:
        assert loss.dtype == torch.float32, "the loss must be computed in fp32"
        assert torch.isfinite(loss)
    param_dtype = next(model.parameters()).dtype
    assert param_dtype == (torch.float64 if name == "64" else torch.float32)
    if name == "16":
        # GradScaler may skip an overflowing step, but then it must lower the scale
        scale = precision.state_dict()["scale"]
        assert changed or scale < 2.0**16
        assert precision.state_dict()  # the scaler state goes into checkpoints
    else:
        assert changed


def test_channels_last_step():
    model, _, losses, changed = _step("bf16", channels_last=True)
    assert all(torch.isfinite(loss) for loss in losses) and changed
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)
                and m.weight.shape[-1] == 3 and m.groups == 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_declared_precisions():
    pm = get_plugin_manager()
    assert set(pm.names("precision")) >= {"64", "32", "16", "bf16"}
    assert pm.hook.accelcore_precision(name="8") is None


def _capture_backend(graphs: list):
    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def test_compile_captures_the_network_in_one_graph_and_leaves_the_loss_eager():
    # train.compile wraps the whole model (network + loss); the data-dependent SimOTA loss must
    # stay out of the graph, or every new target count would graph-break and recompile.
    from accelcore import create_model

    torch.manual_seed(0)
    model = create_model("yolox_nano", num_classes=3).train()
    images, targets = _batch()
    graphs: list = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_capture_backend(graphs))
    out = compiled(images, targets)
    _, second_targets = _batch()
    second_targets[:, 2] = torch.tensor([0.0, 64.0, 64.0, 16.0, 16.0])  # a new target count
    compiled(images, second_targets)
    torch._dynamo.reset()
    assert len(graphs) == 1, f"expected one captured graph, got {len(graphs)}"
    targets_called = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert any("conv2d" in t for t in targets_called)
    assert not any("topk" in t for t in targets_called), "SimOTA leaked into the graph"
    expected = model(images, targets)
    assert torch.allclose(out["total_loss"], expected["total_loss"])


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    import copy

    from accelcore import create_model

    torch.manual_seed(0)
    eager = create_model("yolox_nano", num_classes=3).train()
    compiled_model = copy.deepcopy(eager)
    images, targets = _batch()
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model)
    loss_e = eager(images, targets)["total_loss"]
    loss_c = compiled(images, targets)["total_loss"]
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-3, atol=1e-4)
    loss_e.backward()
    loss_c.backward()
    torch._dynamo.reset()
    # Summation order differs (fused kernels), so compare each gradient as a whole: relative
    # error of the tensor, not of its smallest elements.
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters(),
                                strict=True):
        if p_e.grad is not None:
            err = float((p_c.grad - p_e.grad).norm() / p_e.grad.norm().clamp_min(1e-12))
            assert err < 1e-3, f"{name}: relative gradient error {err:.2e}"
