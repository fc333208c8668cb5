"""TorchScript methods: jit_fp32 / jit_bf16."""

from __future__ import annotations

import pytest
import torch
from test_inference_support import accelerate, images, raw_model, rel_err, reload, request

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
