"""YOLOX checkpoint loading: official / own layouts, class mismatch, finetune, errors."""

from __future__ import annotations

import logging

import pytest
import torch
from accelcore_yolox.checkpoint import load_checkpoint

from accelcore import registry
from accelcore.errors import CheckpointError


def _model(num_classes=80, name="yolox_nano"):
    return registry.create_model(name, num_classes=num_classes)


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    m = _model(80)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


def _same(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


def test_official_layout_and_bare_state_dict(source, tmp_path):
    official = tmp_path / "yolox_nano.pth"
    torch.save({"start_epoch": 300, "model": source.state_dict(), "optimizer": {}}, official)
    bare = tmp_path / "bare.pth"
    torch.save(source.state_dict(), bare)
    for path in (official, bare):
        m = _model(80)
        info = load_checkpoint(m, path)
        assert _same(m, source) and info["dropped"] == []


def test_own_layout_prefers_ema(source, tmp_path):
    plain = _model(80)
    path = tmp_path / "ours.pth"
    torch.save(
        {"model": plain.state_dict(), "ema": {"module": source.state_dict(), "updates": 5}}, path
    )
    m = _model(80)
    assert load_checkpoint(m, path)["source"] == "ema" and _same(m, source)
    m = _model(80)
    assert load_checkpoint(m, path, use_ema=False)["source"] == "model" and _same(m, plain)
    # DDP-style "module." prefixes are stripped
    ddp = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, ddp)
    m = _model(80)
    load_checkpoint(m, ddp)
    assert _same(m, source)


def test_old_checkpoint_without_num_batches_tracked(source, tmp_path):
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save({"model": sd}, path)
    m = _model(80)
    load_checkpoint(m, path)
    assert _same(m, source)


def test_wrong_class_count_errors_then_finetune_drops_cls_preds(source, tmp_path, caplog):
    path = tmp_path / "coco.pth"
    torch.save({"model": source.state_dict()}, path)
    m = _model(3)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(m, path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "80 classes" in msg and "3" in msg
    assert "model.finetune=true" in msg

    m = _model(3)
    fresh_cls = m.head.cls_preds[0].weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        info = load_checkpoint(m, path, finetune=True)
    expected = sorted(f"head.cls_preds.{i}.{p}" for i in range(3) for p in ("weight", "bias"))
    assert info["dropped"] == expected
    assert "head.cls_preds.0.weight" in caplog.text
    assert torch.equal(m.head.cls_preds[0].weight, fresh_cls)  # left at its init
    assert _same(m, source, skip=("head.cls_preds.",))  # everything else loaded


def test_other_size_and_missing_file(source, tmp_path):
    path = tmp_path / "nano.pth"
    torch.save({"model": source.state_dict()}, path)
    with pytest.raises(CheckpointError, match="does not fit model yolox_tiny"):
        load_checkpoint(_model(80, "yolox_tiny"), path, finetune=True)
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="not found") as err:
        load_checkpoint(_model(80), missing)
    assert str(missing) in str(err.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(_model(80), junk)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_checkpoint(_model(80), empty)


def test_checkpoint_info_hook(source):
    from accelcore_yolox import accelcore_checkpoint_info

    official = {"start_epoch": 300, "model": source.state_dict(), "optimizer": {}}
    assert accelcore_checkpoint_info(official) == {"num_classes": 80}
    assert accelcore_checkpoint_info(source.state_dict()) == {"num_classes": 80}
    ours = {"model": _model(3).state_dict(),
            "meta": {"name": "yolox_nano", "num_classes": 3, "input_size": [320, 320]}}
    assert accelcore_checkpoint_info(ours) == {"name": "yolox_nano", "num_classes": 3,
                                               "input_size": [320, 320]}
    # Not YOLOX: another model's accelcore checkpoint, weights without a YOLOX head, no weights.
    other = {"model": {"conv.weight": torch.zeros(4, 3, 1, 1)}, "meta": {"name": "tiny_grid"}}
    assert accelcore_checkpoint_info(other) is None
    assert accelcore_checkpoint_info({"model": {"conv.weight": torch.zeros(4, 3, 1, 1)}}) is None
    assert accelcore_checkpoint_info({"epoch": 3}) is None
