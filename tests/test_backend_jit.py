"""TorchScript methods: jit_fp32 / jit_bf16."""

from __future__ import annotations

import pytest
import torch
from inference_helpers import accelerate, images, raw_model, rel_err, reload, request

TOL = {"jit_fp32": 1e-4, "jit_bf16": 5e-2}  # freeze folds BN into convs: not bit-identical


@pytest.fixture(scope="module")
def model():
    return raw_model()


@pytest.mark.parametrize("method", ["jit_fp32", "jit_bf16"])
def test_convert_close_and_round_trip(method, model, tmp_path):
    x = images(3)  # traced at batch 2: the batch size must stay symbolic
    ref = model(x)
    acc = accelerate(method, model, request(tmp_path))
    out = acc(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < TOL[method]
    assert acc.precision == method.split("_")[1]
    loaded = reload(method, acc, tmp_path / "artifact")
    torch.testing.assert_close(loaded(x), out, rtol=1e-4, atol=1e-4)


def test_bf16_graph_really_casts(model, tmp_path):
    acc = accelerate("jit_bf16", model, request(tmp_path))
    loaded = reload("jit_bf16", acc, tmp_path / "a")
    assert loaded(images()).dtype == torch.float32
    script = torch.jit.load(str(tmp_path / "a" / "model.torchscript"))
    kinds = {n.kind() for n in script.graph.nodes()} | {
        n.kind() for n in script.inlined_graph.nodes()}
    assert any("reduced_precision" in k or k == "aten::to" for k in kinds), kinds


def _weights_channels_last(script: torch.jit.ScriptModule) -> list[bool]:
    """For every 4-D constant (conv weight) of the frozen graph: is it NHWC?"""
    found = []
    for node in script.inlined_graph.nodes():
        if node.kind() == "prim::Constant" and node.output().type().kind() == "TensorType":
            value = node.output().toIValue()
            if value.dim() == 4 and value.shape[1] > 1 and value.shape[2] * value.shape[3] > 1:
                found.append(value.is_contiguous(memory_format=torch.channels_last))
    return found


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_trace_leaves_the_caller_model_alone(channels_last, tmp_path):
    import copy

    from accelcore.plugins import get_plugin_manager

    model = raw_model(prefer_yolox=False)
    before = copy.deepcopy(model.state_dict())
    req = request(tmp_path)
    req.options = {"channels_last": channels_last}
    acc = get_plugin_manager().hook.accelcore_accelerate(method="jit_fp32", model=model,
                                                        request=req)
    assert acc.details["channels_last"] is channels_last
    assert all(p.is_contiguous() for p in model.parameters())  # not converted in place
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    script = torch.jit.load(str(reload("jit_fp32", acc, tmp_path / "a").save and
                                (tmp_path / "a" / "model.torchscript")))
    layouts = _weights_channels_last(script)
    assert layouts and all(x is channels_last for x in layouts)
    x = images(3)
    assert rel_err(acc(x), model(x)) < TOL["jit_fp32"]
