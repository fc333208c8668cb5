"""YOLOX model plugin: zoo sizes, official naming, output modes, exportability, hooks."""

from __future__ import annotations

import importlib.util
import io
import math
from types import SimpleNamespace

import accelcore_yolox
import pytest
import torch
from accelcore_yolox.complexity import count_gflops, count_params
from accelcore_yolox.zoo import MODEL_NAMES, SPECS

from accelcore import registry
from accelcore.errors import RecipeError


def create(name: str, **kwargs):
    """Through the public helper, i.e. the plugin manager and the yolox plugin's hook."""
    return registry.create_model(name, **kwargs)


def test_all_sizes_found_through_the_plugin():
    assert set(registry.list_models("yolox_*")) == set(MODEL_NAMES)
    assert registry.list_models("yolox_n*") == ["yolox_nano"]
    assert set(MODEL_NAMES) == {
        "yolox_nano",
        "yolox_tiny",
        "yolox_s",
        "yolox_m",
        "yolox_l",
        "yolox_x",
        "yolox_custom",
    }


def _meta_model(name: str, **kw):
    # Built on the meta device: no memory, no init cost; FLOPs counted without computing.
    with torch.device("meta"):
        return create(name, **kw)


@pytest.mark.parametrize("name", list(SPECS))
def test_param_count_matches_zoo(name):
    spec = SPECS[name]
    params_m = count_params(_meta_model(name, num_classes=80)) / 1e6
    # The zoo table prints 2 decimals for nano/tiny (0.91, 5.06) and 1 for the others.
    tol = 0.005 if name in ("yolox_nano", "yolox_tiny") else 0.05
    assert abs(params_m - spec.params_m) <= tol, (name, params_m, spec.params_m)


@pytest.mark.parametrize("name", list(SPECS))
def test_gflops_match_zoo(name):
    spec = SPECS[name]
    model = _meta_model(name, num_classes=80)
    zoo = count_gflops(model, spec.input_size, zoo_convention=True)
    conv_only = count_gflops(model, spec.input_size, zoo_convention=False)
    # Zoo convention (thop x2, BN charged) agrees to well within 3% (measured < 0.2%).
    assert abs(zoo / spec.gflops - 1) < 0.01, (name, zoo, spec.gflops)
    # Plain FlopCounterMode (2 x MACs, convs only): within 3% except nano (-3.2%, its BN share
    # is large because depthwise convs are so cheap).
    assert abs(conv_only / spec.gflops - 1) < (0.035 if name == "yolox_nano" else 0.03)
    assert conv_only < zoo


def test_flop_counter_reports_two_flops_per_mac():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        conv(torch.zeros(1, 4, 10, 10))
    macs = 8 * 10 * 10 * 4 * 9
    assert counter.get_total_flops() == 2 * macs


# Hand-written from the official YOLOX source layout (yolox/models/{darknet,yolo_pafpn,
# yolo_head,network_blocks}.py) for YOLOX-Nano, 80 classes: width 0.25 -> base 16 channels,
# depth 0.33 -> 1 bottleneck (3 in dark3/dark4), depthwise convs (dconv/pconv) everywhere except
# the Focus stem, the 1x1 convs and the head stems. These are the keys of the official
# yolox_nano.pth "model" entry; a mismatch here would break strict loading of that file.
OFFICIAL_NANO_KEYS = {
    "backbone.backbone.stem.conv.conv.weight": (16, 12, 3, 3),
    "backbone.backbone.stem.conv.bn.weight": (16,),
    "backbone.backbone.stem.conv.bn.running_mean": (16,),
    "backbone.backbone.stem.conv.bn.num_batches_tracked": (),
    "backbone.backbone.dark2.0.dconv.conv.weight": (16, 1, 3, 3),
    "backbone.backbone.dark2.0.pconv.conv.weight": (32, 16, 1, 1),
    "backbone.backbone.dark2.1.conv1.conv.weight": (16, 32, 1, 1),
    "backbone.backbone.dark2.1.conv2.conv.weight": (16, 32, 1, 1),
    "backbone.backbone.dark2.1.conv3.conv.weight": (32, 32, 1, 1),
    "backbone.backbone.dark2.1.m.0.conv1.conv.weight": (16, 16, 1, 1),
    "backbone.backbone.dark2.1.m.0.conv2.dconv.conv.weight": (16, 1, 3, 3),
    "backbone.backbone.dark2.1.m.0.conv2.pconv.conv.weight": (16, 16, 1, 1),
    "backbone.backbone.dark3.0.dconv.conv.weight": (32, 1, 3, 3),
    "backbone.backbone.dark3.0.pconv.conv.weight": (64, 32, 1, 1),
    "backbone.backbone.dark3.1.m.2.conv2.pconv.conv.weight": (32, 32, 1, 1),
    "backbone.backbone.dark4.0.pconv.conv.weight": (128, 64, 1, 1),
    "backbone.backbone.dark4.1.m.2.conv1.bn.running_var": (64,),
    "backbone.backbone.dark5.0.dconv.conv.weight": (128, 1, 3, 3),
    "backbone.backbone.dark5.0.pconv.conv.weight": (256, 128, 1, 1),
    "backbone.backbone.dark5.1.conv1.conv.weight": (128, 256, 1, 1),
    "backbone.backbone.dark5.1.conv2.conv.weight": (256, 512, 1, 1),
    "backbone.backbone.dark5.2.conv1.conv.weight": (128, 256, 1, 1),
    "backbone.backbone.dark5.2.conv3.conv.weight": (256, 256, 1, 1),
    "backbone.backbone.dark5.2.m.0.conv2.dconv.conv.weight": (128, 1, 3, 3),
    "backbone.lateral_conv0.conv.weight": (128, 256, 1, 1),
    "backbone.C3_p4.conv1.conv.weight": (64, 256, 1, 1),
    "backbone.C3_p4.conv3.conv.weight": (128, 128, 1, 1),
    "backbone.C3_p4.m.0.conv2.dconv.conv.weight": (64, 1, 3, 3),
    "backbone.reduce_conv1.conv.weight": (64, 128, 1, 1),
    "backbone.C3_p3.conv1.conv.weight": (32, 128, 1, 1),
    "backbone.C3_p3.conv3.bn.bias": (64,),
    "backbone.bu_conv2.dconv.conv.weight": (64, 1, 3, 3),
    "backbone.bu_conv2.pconv.conv.weight": (64, 64, 1, 1),
    "backbone.C3_n3.conv1.conv.weight": (64, 128, 1, 1),
    "backbone.C3_n3.conv3.conv.weight": (128, 128, 1, 1),
    "backbone.bu_conv1.dconv.conv.weight": (128, 1, 3, 3),
    "backbone.C3_n4.conv1.conv.weight": (128, 256, 1, 1),
    "backbone.C3_n4.conv3.conv.weight": (256, 256, 1, 1),
    "head.stems.0.conv.weight": (64, 64, 1, 1),
    "head.stems.1.conv.weight": (64, 128, 1, 1),
    "head.stems.2.conv.weight": (64, 256, 1, 1),
    "head.stems.2.bn.running_mean": (64,),
    "head.cls_convs.0.0.dconv.conv.weight": (64, 1, 3, 3),
    "head.cls_convs.0.1.pconv.conv.weight": (64, 64, 1, 1),
    "head.reg_convs.2.1.pconv.bn.running_var": (64,),
    "head.cls_preds.0.weight": (80, 64, 1, 1),
    "head.cls_preds.2.bias": (80,),
    "head.reg_preds.1.weight": (4, 64, 1, 1),
    "head.reg_preds.1.bias": (4,),
    "head.obj_preds.2.weight": (1, 64, 1, 1),
    "head.obj_preds.0.bias": (1,),
}
OFFICIAL_TOP_PREFIXES = {
    "backbone.backbone.stem",
    "backbone.backbone.dark2",
    "backbone.backbone.dark3",
    "backbone.backbone.dark4",
    "backbone.backbone.dark5",
    "backbone.lateral_conv0",
    "backbone.C3_p4",
    "backbone.reduce_conv1",
    "backbone.C3_p3",
    "backbone.bu_conv2",
    "backbone.C3_n3",
    "backbone.bu_conv1",
    "backbone.C3_n4",
    "head.stems",
    "head.cls_convs",
    "head.reg_convs",
    "head.cls_preds",
    "head.reg_preds",
    "head.obj_preds",
}


def test_nano_state_dict_uses_official_names_and_shapes():
    sd = create("yolox_nano", num_classes=80).state_dict()
    for key, shape in OFFICIAL_NANO_KEYS.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, (key, tuple(sd[key].shape), shape)
    prefixes = {".".join(k.split(".")[: 3 if k.startswith("backbone.backbone") else 2]) for k in sd}
    assert prefixes == OFFICIAL_TOP_PREFIXES
    # A state_dict laid out with official names loads strictly (tolerating nothing).
    official_like = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in sd.items()}
    fresh = create("yolox_nano", num_classes=80)
    fresh.load_state_dict(official_like, strict=True)
    assert torch.equal(
        fresh.state_dict()["head.cls_preds.0.weight"], official_like["head.cls_preds.0.weight"]
    )


def test_structure_details_as_official():
    model = create("yolox_tiny", num_classes=5)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.03 for m in bns)
    assert any(isinstance(m, torch.nn.SiLU) for m in model.modules())
    prior = -math.log((1 - 0.01) / 0.01)
    for conv in (*model.head.cls_preds, *model.head.obj_preds):
        assert torch.allclose(conv.bias, torch.full_like(conv.bias, prior))
    # tiny is not depthwise, nano is
    assert not any(n.endswith("dconv") for n, _ in model.named_modules())
    assert any(n.endswith("dconv") for n, _ in create("yolox_nano").named_modules())
    assert model.meta == {
        "name": "yolox_tiny",
        "num_classes": 5,
        "input_size": (416, 416),
        "strides": (8, 16, 32),
        "depth": 0.33,
        "width": 0.375,
        "depthwise": False,
    }
    assert create("yolox_s").meta["input_size"] == (640, 640)


def test_custom_model():
    model = create("yolox_custom", options={"depth": 0.33, "width": 0.25, "depthwise": True},
                   num_classes=80)
    ref = create("yolox_nano", num_classes=80)
    assert count_params(model) == count_params(ref)
    assert model.meta["name"] == "yolox_custom"


def test_strict_round_trip():
    a = create("yolox_nano", num_classes=3)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    b = create("yolox_nano", num_classes=3)
    b.load_state_dict(a.state_dict(), strict=True)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


@pytest.fixture(scope="module")
def nano3():
    torch.manual_seed(0)
    model = create("yolox_nano", num_classes=3).eval()
    # Non-trivial BN statistics / biases so outputs are not near-constant.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


# One input shape for all forward tests: the first conv call per shape is slow on CPU.
SHAPE = (1, 3, 64, 96)
N_ANCHORS = 8 * 12 + 4 * 6 + 2 * 3


def test_decoded_equals_decode_of_raw(nano3):
    x = torch.rand(*SHAPE) * 255
    hw = SHAPE[2:]
    with torch.no_grad():
        nano3.output_mode = "decoded"
        decoded = nano3(x)
        nano3.output_mode = "raw"
        raw = nano3(x)
    nano3.output_mode = "decoded"
    assert decoded.shape == raw.shape == (1, N_ANCHORS, 8)
    assert torch.equal(nano3.decode(raw, hw), decoded)
    # raw is really raw: logits outside [0, 1] and decode is not the identity
    assert (raw[..., 4:] < 0).any() and not torch.allclose(raw, decoded)
    assert ((decoded[..., 4:] >= 0) & (decoded[..., 4:] <= 1)).all()
    # official decode: (raw_xy + grid) * stride, exp(raw_wh) * stride, row-major anchors;
    # anchor 13 of stride 8 is cell (x=1, y=1) of the 8x12 map
    assert torch.allclose(decoded[0, 13, 0], (raw[0, 13, 0] + 1) * 8)
    assert torch.allclose(decoded[0, 13, 1], (raw[0, 13, 1] + 1) * 8)
    assert torch.allclose(decoded[0, 12, 1], (raw[0, 12, 1] + 1) * 8)  # (x=0, y=1)
    assert torch.allclose(decoded[0, 12, 0], raw[0, 12, 0] * 8)
    assert torch.allclose(decoded[0, 13, 2], raw[0, 13, 2].exp() * 8)
    # first stride-16 anchor sits at grid (0, 0)
    assert torch.allclose(decoded[0, 96, 3], raw[0, 96, 3].exp() * 16)
    assert torch.allclose(decoded[0, 96, 0], raw[0, 96, 0] * 16)
    # decode upcasts to fp32
    assert nano3.decode(raw.bfloat16(), hw).dtype == torch.float32
    with pytest.raises(ValueError, match="anchors"):
        nano3.decode(raw, (64, 64))


def test_training_predictions_fp32_under_autocast_and_equal_to_the_official_modules():
    torch.manual_seed(0)
    head = create("yolox_nano", num_classes=3).head  # its own: training moves BN statistics
    head_input = [torch.rand(2, 64 * 2**k, 8 // 2**k, 12 // 2**k) for k in range(3)]
    for training, expected in ((True, torch.float32), (False, torch.bfloat16)):
        head.train(training)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert head(head_input).dtype == expected
    # Training computes box + objectness with one conv of the stacked weights; inference calls
    # the official modules. Same numbers.
    reg_feat, cls_feat = torch.rand(2, 64, 8, 12), torch.rand(2, 64, 8, 12)
    with torch.no_grad():
        head.train()
        merged = head._predict(0, reg_feat, cls_feat)
        head.eval()
        official = head._predict(0, reg_feat, cls_feat)
    assert merged.shape == (2, 4 + 1 + 3, 8, 12)
    torch.testing.assert_close(merged, official, rtol=1e-5, atol=1e-5)


def test_raw_mode_has_no_data_dependent_control_flow(nano3):
    # torch.fx symbolic tracing fails on any branch that depends on tensor values, so it is a
    # cheap proxy for jit.trace / torch.export / ONNX (exercised in the slow test below).
    nano3.output_mode = "raw"
    x = torch.rand(*SHAPE) * 255
    try:
        gm = torch.fx.symbolic_trace(nano3)
        with torch.no_grad():
            assert torch.allclose(gm(x), nano3(x), atol=1e-5)
        assert not any("sigmoid" in str(n.target) or "exp" in str(n.target) for n in gm.graph.nodes)
    finally:
        nano3.output_mode = "decoded"


@pytest.mark.slow
def test_raw_mode_exports(nano3):
    nano3.output_mode = "raw"
    x = torch.rand(*SHAPE) * 255
    other = torch.rand(*SHAPE) * 255
    try:
        with torch.no_grad():
            ref = nano3(other)
            traced = torch.jit.trace(nano3, x, check_trace=False)
            assert torch.allclose(traced(other), ref, atol=1e-4)
            ep = torch.export.export(nano3, (x,))
            assert torch.allclose(ep.module()(other), ref, atol=1e-4)
            if importlib.util.find_spec("onnx") is not None:
                buf = io.BytesIO()
                torch.onnx.export(nano3, (x,), buf, dynamo=False, opset_version=17)
                assert len(buf.getvalue()) > 100_000
    finally:
        nano3.output_mode = "decoded"


def test_hook_declare():
    decls = accelcore_yolox.accelcore_declare()
    assert {d.name for d in decls} == set(MODEL_NAMES)
    assert all(d.kind == "model" and d.available and d.summary for d in decls)


def _cfg(**kw):
    base = dict(
        name="yolox_nano",
        num_classes=7,
        checkpoint=None,
        finetune=False,
        options={},
        input_size=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def test_hook_build_model():
    assert accelcore_yolox.accelcore_build_model(_cfg(name="resnet50")) is None
    m = accelcore_yolox.accelcore_build_model(_cfg())
    assert m.head.num_classes == 7 and m.meta["num_classes"] == 7
    assert m.meta["input_size"] == (416, 416)
    m = accelcore_yolox.accelcore_build_model(_cfg(input_size=(320, 320)))
    assert m.meta["input_size"] == (320, 320)
    # minimal config object: missing attributes fall back to defaults
    m = accelcore_yolox.accelcore_build_model(SimpleNamespace(name="yolox_nano"))
    assert m.head.num_classes == 80
    c = accelcore_yolox.accelcore_build_model(
        _cfg(name="yolox_custom", options={"depth": 0.33, "width": 0.125, "depthwise": True})
    )
    assert c.meta["width"] == 0.125 and c.meta["input_size"] == (640, 640)
    with pytest.raises(RecipeError, match="yolox_custom"):
        accelcore_yolox.accelcore_build_model(_cfg(options={"width": 0.5}))
    with pytest.raises(RecipeError, match="depth"):
        accelcore_yolox.accelcore_build_model(_cfg(name="yolox_custom"))
    with pytest.raises(RecipeError, match="multiples of 32"):
        accelcore_yolox.accelcore_build_model(_cfg(input_size=[400, 416]))
    with pytest.raises(RecipeError, match="num_classes"):
        accelcore_yolox.accelcore_build_model(_cfg(num_classes=0))


def test_hook_build_model_loads_checkpoint(tmp_path):
    src = create("yolox_nano", num_classes=7)
    with torch.no_grad():
        src.head.reg_preds[0].bias.fill_(0.5)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict()}, path)
    m = accelcore_yolox.accelcore_build_model(_cfg(checkpoint=str(path)))
    assert torch.equal(m.head.reg_preds[0].bias, torch.full((4,), 0.5))


def test_yolox_is_a_detector():
    from accelcore.interfaces import Detector, missing_detector_members

    model = create("yolox_nano", num_classes=3, input_size=[320, 256])
    assert isinstance(model, Detector) and missing_detector_members(model) == []
    assert model.input_size == (320, 256) and model.num_classes == 3
    assert model.meta["name"] == "yolox_nano" and model.output_mode == "decoded"
    assert not model.head.use_l1
    model.start_no_augmentation()
    model.start_no_augmentation()  # idempotent
    assert model.head.use_l1


def test_create_model_errors():
    from accelcore.errors import PluginError

    with pytest.raises(PluginError, match="did you mean 'yolox_nano'"):
        create("yolox_nan")
    with pytest.raises(RecipeError, match="unknown option 'num_class'.*did you mean 'num_classes'"):
        create("yolox_nano", num_class=3)
