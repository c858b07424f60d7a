"""Rule export_onnx: a stage's model (train or finetune) as an ONNX file, to serve it without PyTorch.

Exported with a dynamic batch dimension and kept only if ONNX Runtime reproduces PyTorch on the whole test split
of the model's dataset (same normalisation as the stages): max |logit difference| <= `onnx.tolerance` and the same
predicted class for every image. Otherwise the stage fails, naming the measured difference, and writes no .onnx.
The parity numbers go to <name>.json and to the stage's MLflow run, with the .onnx file as an artifact."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import torch

from hpcdl import tracking
from hpcdl.atomic import atomic_output, atomic_write_json
from hpcdl.cli import stage_parser
from hpcdl.stage_clock import StageClock
from hpcdl.stage_runtime import load_data, load_model_file

# torch.onnx.export(dynamo=True): torch.export's graph, translated by onnxscript. The default exporter since torch
# 2.9; the TorchScript one (dynamo=False) still works in 2.14.1 but warns that it is deprecated and will be removed.
# torch.export also proves the batch dimension dynamic (it fails if the model specialises on it).
EXPORTER = "dynamo"
EXAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1: an example batch of 1 would fix the batch dimension
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ParityError(RuntimeError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance, or predict another class."""


def export(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """Write `model` (in eval mode) as one self-contained ONNX file with a dynamic batch dimension."""
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,  # weights inside the file: one artifact (ONNX's 2 GB limit is far off)
        verbose=False,
    )


def ort_session(path: Path, threads: int):
    """An ONNX Runtime CPU session using `threads` threads for an operator and none across operators."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.inference_mode()
def side_by_side(model, session, split, normalise, batch_size: int) -> dict:
    """PyTorch's and ONNX Runtime's logits for every image of `split`, fed the same normalised batches, and the
    seconds each spent in the model alone (after one untimed warm-up batch: both set up lazily on the first call)."""
    model.eval()
    warm_up = normalise(np.take(split.x, np.arange(min(batch_size, len(split))), axis=0))
    model(warm_up)
    session.run([OUTPUT_NAME], {INPUT_NAME: warm_up.numpy()})
    torch_out, ort_out, seconds = [], [], {"torch": 0.0, "ort": 0.0}
    for start in range(0, len(split), batch_size):
        x = normalise(np.take(split.x, np.arange(start, min(start + batch_size, len(split))), axis=0))
        started = time.perf_counter()
        torch_out.append(model(x).numpy())
        between = time.perf_counter()
        ort_out.append(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
        seconds["torch"] += between - started
        seconds["ort"] += time.perf_counter() - between
    return {"torch": np.concatenate(torch_out), "ort": np.concatenate(ort_out), "seconds": seconds}


def parity(torch_logits: np.ndarray, ort_logits: np.ndarray, labels: np.ndarray, tolerance: float) -> dict:
    """How far ONNX Runtime is from PyTorch, and whether that is within `tolerance` with the same predictions."""
    disagreements = int((torch_logits.argmax(1) != ort_logits.argmax(1)).sum())
    max_abs_diff = float(np.abs(torch_logits.astype(np.float64) - ort_logits).max())
    return {
        "n": len(labels),
        "max_abs_diff": max_abs_diff,
        "tolerance": tolerance,
        "argmax_disagreements": disagreements,
        "argmax_agreement": 1.0 - disagreements / len(labels),
        "passed": max_abs_diff <= tolerance and disagreements == 0,
        "torch_accuracy": float((torch_logits.argmax(1) == labels).mean()),
        "onnx_accuracy": float((ort_logits.argmax(1) == labels).mean()),
    }


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv=None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--name", required=True, help="which stage's model: train or finetune (the run is export_onnx-<name>)")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="the .onnx file")
    parser.add_argument("--parity-json", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of PyTorch and ONNX Runtime (the rule's threads)")
    args = parser.parse_args(argv)
    cfg = args.params["onnx"]
    clock = StageClock()
    torch.set_num_threads(args.threads)
    model, record = load_model_file(args.model)
    manifest, splits, normalise = load_data(args.data_dir)
    test = splits["test"]
    clock.mark("data")
    run_name = f"export_onnx-{args.name}"
    tags = tracking.runtime_tags("export_onnx", image_record=args.params.get("image_record"), world_size=1)
    try:
        with tracking.stage_run(args.params["mlflow"], stage="export_onnx", parent_run_file=args.parent_run, tags=tags, run_name=run_name) as run:
            tracking.print_where(args.params["mlflow"], run)
            clock.mark("mlflow_setup")
            mlflow.set_tags({"hpcdl.model_run_id": record.get("mlflow_run_id"), "hpcdl.model_uri": record.get("model_uri")})
            mlflow.log_params({
                "onnx.opset": cfg["opset"], "onnx.exporter": EXPORTER, "onnx.tolerance": cfg["tolerance"],
                "onnx.batch_size": cfg["batch_size"], "onnx.threads": args.threads, "onnx.example_batch": EXAMPLE_BATCH,
                "model.name": args.name, "model.arch": record["arch"], "model.run_id": record.get("mlflow_run_id"),
                "model.uri": record.get("model_uri"),
            })
            tracking.log_dataset(test.x, test.y, name=f"{manifest['provenance']['source']}-test", context="evaluation",
                                 sha256={k: v for k, v in manifest["files"].items() if k.startswith("test_")}, source=args.data_dir.resolve().as_uri())
            summary = export_and_compare(model, record, test, normalise, args, cfg, clock)
            summary["mlflow"] = {"run_id": run.info.run_id}
            mlflow.log_artifact(str(args.out))
            mlflow.log_dict(summary, f"{args.parity_json.name}")
            clock.mark("artifacts")
            mlflow.log_metrics(clock.metrics())
            atomic_write_json(args.parity_json, summary)
    except ParityError as error:
        print(f"hpcdl: {run_name} failed: {error}", file=sys.stderr, flush=True)
        return 1
    check = summary["parity"]
    print(f"hpcdl: exported {record['arch']} ({args.name}) to {args.out}: ONNX Runtime matches PyTorch on {check['n']} test images "
          f"(max |diff| {check['max_abs_diff']:.2e} <= {check['tolerance']:g}, same class for all); ONNX test accuracy "
          f"{100 * check['onnx_accuracy']:.2f}%, {summary['throughput']['ort_samples_per_second']:,.0f} samples/s", flush=True)
    return 0


def export_and_compare(model, record: dict, test, normalise, args, cfg: dict, clock: StageClock) -> dict:
    """Export to a temporary file, check it and compare it on the test split; it becomes args.out only if it
    passes (atomic_output deletes it otherwise). Logs the parity metrics either way."""
    import onnx
    import onnxruntime

    with atomic_output(args.out) as tmp:
        export(model, normalise(test.x[:EXAMPLE_BATCH]), tmp, cfg["opset"])
        onnx.checker.check_model(str(tmp), full_check=True)
        proto = onnx.load(str(tmp), load_external_data=False)
        clock.mark("export")
        outputs = side_by_side(model, ort_session(tmp, args.threads), test, normalise, cfg["batch_size"])
        check = parity(outputs["torch"], outputs["ort"], test.y, cfg["tolerance"])
        clock.mark("parity")
        throughput = {f"{engine}_samples_per_second": check["n"] / max(seconds, 1e-9) for engine, seconds in outputs["seconds"].items()}
        mlflow.log_metrics({
            "max_abs_diff": check["max_abs_diff"], "argmax_agreement": check["argmax_agreement"],
            "argmax_disagreements": check["argmax_disagreements"], "onnx_test_accuracy": check["onnx_accuracy"],
            "torch_test_accuracy": check["torch_accuracy"], **throughput, "onnx_file_mb": tmp.stat().st_size / 2**20,
        })
        if not check["passed"]:
            raise ParityError(
                f"ONNX Runtime differs from PyTorch on the {check['n']} test images: max abs difference of the logits "
                f"{check['max_abs_diff']:.3e} (tolerance onnx.tolerance={check['tolerance']:g}), "
                f"{check['argmax_disagreements']} argmax disagreement(s); no {args.out.name} written"
            )
        size, digest = tmp.stat().st_size, sha256_of(tmp)
    return {
        "model": {"name": args.name, "arch": record["arch"], "file": str(args.model), "mlflow_run_id": record.get("mlflow_run_id"), "model_uri": record.get("model_uri")},
        "onnx": {
            "file": args.out.name, "bytes": size, "sha256": digest, "opset": cfg["opset"], "ir_version": proto.ir_version,
            "exporter": EXPORTER, "example_batch": EXAMPLE_BATCH, "input": INPUT_NAME, "output": OUTPUT_NAME,
            "input_shape": [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim],
        },
        "parity": check,
        "throughput": {**throughput, "batch_size": cfg["batch_size"], "threads": args.threads, "provider": "CPUExecutionProvider"},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


if __name__ == "__main__":
    sys.exit(main())
