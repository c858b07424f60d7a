"""P7: inference throughput of the exported model: ONNX Runtime vs PyTorch eager vs torch.compile, one thread each.

The default model (LeNet-5 on 1x28x28 mnist5k test images, normalised as the stages do) at batch 1 (serving one
request) and 256 (scoring a split). ONNX Runtime runs the file rule export_onnx writes (hpcdl.export_onnx.export,
dynamo exporter, opset 20, CPUExecutionProvider); torch.compile is inductor's default mode, compiled once per batch
size (static shapes, its best case; compile time printed apart). All three run in one process, measured side by
side: rounds of about --seconds per engine in turn, best round kept (the least disturbed by other processes).
--check: exit 1 if ONNX Runtime is slower than PyTorch eager at batch 256 (what serving the ONNX file must not
cost); the outputs of all three must also agree (max |diff| <= 1e-4)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from hpcdl.data.prepare import load_split, write_dataset
from hpcdl.data.sources import fetch_source, load_raw
from hpcdl.export_onnx import EXAMPLE_BATCH, INPUT_NAME, OUTPUT_NAME, export, ort_session
from hpcdl.loop import Normaliser
from hpcdl.models import build_model

BATCHES = (1, 256)
OPSET = 20  # the config's default (onnx.opset)


def throughput(call, batch: int, seconds: float) -> float:
    """samples/s of `call` (one batch per call) over about `seconds`."""
    calls, started = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return calls * batch / elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per engine and batch size (best kept)")
    parser.add_argument("--check", action="store_true", help="exit 1 if ONNX Runtime is slower than eager at batch 256")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        provenance = fetch_source({"source": "mnist5k"}, root / "raw")
        images, labels, classes = load_raw(root / "raw")
        manifest = write_dataset(root / "data", images, labels, classes, image_size=28, channels=1, val_fraction=0.05, test_fraction=0.15, seed=0, provenance=provenance)
        test_x, _ = load_split(root / "data", "test")
        x = Normaliser(manifest["mean"], manifest["std"])(np.array(test_x[: max(BATCHES)]))
        torch.manual_seed(0)
        model = build_model("lenet5", in_channels=1, image_size=28, num_classes=10).eval()
        started = time.perf_counter()
        export(model, x[:EXAMPLE_BATCH], root / "lenet5.onnx", OPSET)
        export_seconds = time.perf_counter() - started
        session = ort_session(root / "lenet5.onnx", threads=1)

        compiled = torch.compile(model)
        compile_seconds, results, max_diff = {}, {}, 0.0
        with torch.inference_mode():
            for batch in BATCHES:
                xb, xb_numpy = x[:batch].contiguous(), x[:batch].numpy()
                started = time.perf_counter()
                compiled(xb)  # compiles for this shape
                compile_seconds[batch] = time.perf_counter() - started
                engines = {
                    "pytorch eager": lambda xb=xb: model(xb),
                    "torch.compile": lambda xb=xb: compiled(xb),
                    "onnxruntime": lambda xb_numpy=xb_numpy: session.run([OUTPUT_NAME], {INPUT_NAME: xb_numpy}),
                }
                reference = model(xb).numpy()
                max_diff = max(max_diff, float(np.abs(compiled(xb).numpy() - reference).max()),
                               float(np.abs(session.run([OUTPUT_NAME], {INPUT_NAME: xb_numpy})[0] - reference).max()))
                best = dict.fromkeys(engines, 0.0)
                for _ in range(args.rounds):
                    for name, call in engines.items():
                        call()  # warm
                        best[name] = max(best[name], throughput(call, batch, args.seconds))
                results[batch] = best

    print(f"lenet5 on 1x28x28 (mnist5k test images), 1 thread each, best of {args.rounds} rounds of {args.seconds:g} s; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__} ({session.get_providers()[0]}, opset {OPSET})")
    print(f"export {export_seconds:.1f} s; torch.compile first call: " + ", ".join(f"batch {b}: {s:.1f} s" for b, s in compile_seconds.items()))
    print(f"{'batch':>5}  {'engine':<14} {'samples/s':>12}  {'vs eager':>8}")
    for batch, best in results.items():
        for name, rate in best.items():
            print(f"{batch:>5}  {name:<14} {rate:>12,.0f}  {rate / best['pytorch eager']:>7.2f}x")
    ratio = results[256]["onnxruntime"] / results[256]["pytorch eager"]
    print(f"P7 ONNX Runtime / eager at batch 256: {ratio:.2f}x (check: >= 1.00x); at batch 1: "
          f"{results[1]['onnxruntime'] / results[1]['pytorch eager']:.2f}x; max |diff| of the outputs vs eager {max_diff:.1e}")
    return 1 if args.check and (ratio < 1.0 or max_diff > 1e-4) else 0


if __name__ == "__main__":
    sys.exit(main())
