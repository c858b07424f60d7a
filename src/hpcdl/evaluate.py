"""Rule evaluate: the trained model on the held-out test split: accuracy, loss, per-class precision/recall/F1,
confusion matrix and misclassified-image grid, all recorded in metrics.json (the rule's output) and MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow

from hpcdl import tracking
from hpcdl.atomic import atomic_write_json
from hpcdl.cli import stage_parser
from hpcdl.loop import predict
from hpcdl.metrics import classification_report
from hpcdl.plots import plot_confusion, plot_misclassified
from hpcdl.stage_clock import StageClock
from hpcdl.stage_runtime import load_data, load_model_file


def evaluate_model(model, manifest: dict, splits: dict, normalise, out_dir: Path, *, title: str, misclassified: bool = True) -> dict:
    """Report on the test split and draw the PNGs into out_dir (shared with the finetune stage)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    test = splits["test"]
    logits = predict(model, test, normalise)
    report = classification_report(logits, test.y, manifest["classes"])
    plot_confusion(report["confusion_matrix"], manifest["classes"], out_dir / "confusion_matrix.png", title=f"{title}: test accuracy {100 * report['accuracy']:.2f}%")
    if misclassified:
        plot_misclassified(test.x, test.y, logits.argmax(1).numpy(), manifest["classes"], out_dir / "misclassified.png")
    return report


def main(argv=None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--out-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    clock = StageClock()
    model, record = load_model_file(args.model)
    manifest, splits, normalise = load_data(args.data_dir)
    clock.mark("data")
    with tracking.stage_run(args.params["mlflow"], stage="evaluate", parent_run_file=args.parent_run, tags=tracking.runtime_tags("evaluate", image_record=args.params.get("image_record"), world_size=1)) as run:
        tracking.print_where(args.params["mlflow"], run)
        clock.mark("mlflow_setup")
        mlflow.set_tags({"hpcdl.model_run_id": record.get("mlflow_run_id"), "hpcdl.model_uri": record.get("model_uri")})
        mlflow.log_params({"model.arch": record["arch"], "model.uri": record.get("model_uri")})
        test = splits["test"]
        tracking.log_dataset(test.x, test.y, name=f"{manifest['provenance']['source']}-test", context="evaluation",
                             sha256={k: v for k, v in manifest["files"].items() if k.startswith("test_")}, source=args.data_dir.resolve().as_uri())
        report = evaluate_model(model, manifest, splits, normalise, args.out_dir, title=record["arch"])
        report["model"] = {"arch": record["arch"], "mlflow_run_id": record.get("mlflow_run_id"), "model_uri": record.get("model_uri")}
        mlflow.log_metrics({"test_accuracy": report["accuracy"], "test_loss": report["loss"], "test_macro_f1": report["macro_f1"]})
        mlflow.log_artifact(str(args.out_dir / "confusion_matrix.png"))
        mlflow.log_artifact(str(args.out_dir / "misclassified.png"))
        mlflow.log_dict(report, "metrics.json")
        clock.mark("evaluation")
        mlflow.log_metrics(clock.metrics())
        atomic_write_json(args.out_dir / "metrics.json", report)
    print(f"hpcdl: test accuracy {100 * report['accuracy']:.2f}% (loss {report['loss']:.4f}, n={report['n']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
