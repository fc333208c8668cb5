"""Inference acceleration core: the machinery every backend shares.

* :mod:`.latency` — ``measure_latency`` (one timing procedure for every method), ``versions``.
* :mod:`.calibration` — real, letterboxed calibration / latency images.
* :mod:`.pt2e` — torch.export, static int8 PT2E, inductor compilation with freezing.
* :mod:`.export` — the example batch and dynamic batch every conversion uses; ONNX export.
* :mod:`.artifact` — artifact folders (payload + ``manifest.json``) and ``load_artifact``.
* :mod:`.accelerate` — the accelerate stage (convert, time, evaluate, save, select).
* :mod:`.select` — the accuracy criterion.

Submodules are imported on demand so that importing this package stays cheap.
"""
