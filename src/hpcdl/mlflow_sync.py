"""Copy the runs that jobs logged offline (hpcdl.mlflow_store) into the tracking server, losing nothing:

    python -m hpcdl.mlflow_sync results/mlflow-offline http://login1:5000

Run by the workflow's onsuccess/onerror handlers on the submitting host, and by hand (idempotent: a second sync
adds nothing). MLflow has no store-to-store copy, and mlflow-export-import gives new start/end times, keeps stale
parent links on import-run and duplicates runs on a second import, so this copy is written on MLflow's client API:

- every run once: params, tags, the full history of every metric (step, timestamp, value), artifacts, dataset
  inputs, logged models (their artifacts, params, tags) and their registered versions, status, start and end time;
- the parent/child nesting, with parents that were offline too mapped to their copies;
- an offline run that continues a server run the job could not reach (a resumed stage, tag
  hpcdl.sync.target_run_id) is merged into that server run, so a requeued stage still ends as one run;
- which source run became which target run: <source>/synced.json, and the tags hpcdl.sync.source_run_id and
  hpcdl.sync.source_store on every copy. A sync that stopped half way goes on where it stopped.
- a run unchanged since its last complete copy is passed over without asking the server anything: synced.json keeps
  a digest of what was copied (read from the local store), so a workflow that syncs a growing folder of stores at
  every end pays only for what is new. A run that changed (a resumed stage logged more) is compared field by field.
Credentials for the server: MLflow's usual places (MLFLOW_TRACKING_USERNAME/PASSWORD or ~/.mlflow/credentials)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from mlflow.entities import DatasetInput, LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from hpcdl.atomic import atomic_write_json
from hpcdl.mlflow_store import CONTINUES_RUN, CONTINUES_STORE, CredentialsError, check_credentials

RECORD = "synced.json"
SOURCE_RUN, SOURCE_STORE, SOURCE_MODEL = "hpcdl.sync.source_run_id", "hpcdl.sync.source_store", "hpcdl.sync.source_model_id"
PARENT = "mlflow.parentRunId"
BATCH = 1000  # MLflow's limit of metrics per log_batch call
TERMINAL = {"FINISHED", "FAILED", "KILLED"}


def all_runs(client: MlflowClient) -> list:
    runs = []
    for experiment in client.search_experiments():
        token = None
        while True:
            page = client.search_runs([experiment.experiment_id], max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    return runs


def parents_first(entries: list) -> list:
    """Order (client, store, run) entries of all stores so that every parent comes before its children (a stage's
    offline store holds its run; the workflow's parent run lies in another store, or in the server)."""
    by_id = {run.info.run_id: run for _, _, run in entries}

    def depth(run, seen=()):
        parent = run.data.tags.get(PARENT)
        return 0 if parent not in by_id or parent in seen else 1 + depth(by_id[parent], (*seen, parent))

    return sorted(entries, key=lambda entry: (depth(entry[2]), entry[2].info.start_time))


def source_digest(source: MlflowClient, run) -> str:
    """Everything the sync copies of a source run, read from its local store, as one digest: the same digest as at
    the run's last complete copy means there is nothing new to copy."""
    run_id = run.info.run_id

    def artifacts(path=None):
        return [(item.path, item.file_size, artifacts(item.path) if item.is_dir else None) for item in source.list_artifacts(run_id, path)]

    models = [m for m in source.search_logged_models(experiment_ids=[run.info.experiment_id]) if m.source_run_id == run_id]
    state = {
        "info": [run.info.status, run.info.start_time, run.info.end_time, run.info.run_name, run.info.lifecycle_stage],
        "params": run.data.params, "tags": run.data.tags,
        "metrics": {key: sorted((m.step, m.timestamp, m.value) for m in source.get_metric_history(run_id, key)) for key in run.data.metrics},
        "artifacts": artifacts(),
        "inputs": sorted([item.dataset.name, item.dataset.digest, sorted((t.key, t.value) for t in item.tags)]
                         for item in run.inputs.dataset_inputs),
        "models": sorted([m.model_id, str(m.status)] for m in models),
        "versions": sorted([v.name, v.version] for v in source.search_model_versions(f"run_id = '{run_id}'")),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


class Sync:
    def __init__(self, source_dir: Path, target_uri: str, verbose: bool = False):
        self.verbose = verbose
        self.source_dir = Path(source_dir)
        self.target = MlflowClient(tracking_uri=target_uri)
        self.record_path = self.source_dir / RECORD
        self.record = json.loads(self.record_path.read_text()) if self.record_path.exists() else {"runs": {}, "models": {}}
        self.record.setdefault("copied", {})  # store -> source run id -> source_digest at its last complete copy
        self.counts = Counter()
        self.experiments: dict[str, str] = {}

    def save(self) -> None:
        atomic_write_json(self.record_path, self.record)

    def run(self) -> Counter:
        entries = []
        for store in sorted(self.source_dir.glob("*.db")):
            source = MlflowClient(tracking_uri=f"sqlite:///{store.resolve()}")
            entries += [(source, store.name, run) for run in all_runs(source)]
        for source, store, run in parents_first(entries):
            self.sync_run(source, store, run)
            self.save()
        return self.counts

    # --- one run ---------------------------------------------------------------------------------------------------

    def target_experiment(self, source: MlflowClient, experiment_id: str) -> str:
        experiment = source.get_experiment(experiment_id)
        if experiment.name not in self.experiments:
            found = self.target.get_experiment_by_name(experiment.name)
            if found is None:
                self.experiments[experiment.name] = self.target.create_experiment(experiment.name, tags=experiment.tags)
                self.counts["experiments"] += 1
            else:
                self.experiments[experiment.name] = found.experiment_id
        return self.experiments[experiment.name]

    def mapped(self, run_id: str | None) -> str | None:
        """The target id of a source run (any store) already synced, else the id itself (it lives in the target)."""
        for runs in self.record["runs"].values():
            if run_id in runs:
                return runs[run_id]
        return run_id

    def find_or_create(self, source: MlflowClient, store: str, run, experiment_id: str) -> tuple[str, bool]:
        tags = run.data.tags
        known = self.record["runs"].setdefault(store, {}).get(run.info.run_id)
        if known:
            return known, CONTINUES_RUN in tags
        if CONTINUES_RUN in tags:
            target_id = tags[CONTINUES_RUN]
            self.target.get_run(target_id)  # must exist: it is the run this one continues
            return target_id, True
        earlier = self.target.search_runs([experiment_id], filter_string=f"tags.`{SOURCE_RUN}` = '{run.info.run_id}'", max_results=1)
        if earlier:  # synced before, record lost
            return earlier[0].info.run_id, False
        created = self.target.create_run(experiment_id, start_time=run.info.start_time, run_name=run.info.run_name,
                                         tags={SOURCE_RUN: run.info.run_id, SOURCE_STORE: store})
        self.counts["runs"] += 1
        return created.info.run_id, False

    def sync_run(self, source: MlflowClient, store: str, run) -> None:
        digest = source_digest(source, run)
        copied = self.record["copied"].setdefault(store, {})
        if copied.get(run.info.run_id) == digest:
            if self.verbose:
                print(f"  {run.info.run_name}: unchanged since its last sync", flush=True)
            return
        experiment_id = self.target_experiment(source, run.info.experiment_id)
        target_id, continuation = self.find_or_create(source, store, run, experiment_id)
        self.record["runs"][store][run.info.run_id] = target_id
        target_run = self.target.get_run(target_id)
        self.sync_tags(run, target_run, continuation)
        self.sync_params(run, target_run)
        self.sync_metrics(source, run, target_run, continuation)
        self.sync_artifacts(source, run.info.run_id, target_id)
        self.sync_inputs(run, target_run)
        self.sync_models(source, run, target_run, experiment_id)
        self.sync_status(run, target_run, continuation)
        copied[run.info.run_id] = digest

    def sync_tags(self, run, target_run, continuation: bool) -> None:
        skip = {CONTINUES_RUN, CONTINUES_STORE, SOURCE_RUN, SOURCE_STORE} | ({"mlflow.runName"} if continuation else set())
        wanted = {key: value for key, value in run.data.tags.items() if key not in skip}
        if PARENT in wanted:
            wanted[PARENT] = self.mapped(wanted[PARENT])
        missing = [RunTag(key, value) for key, value in wanted.items() if target_run.data.tags.get(key) != value]
        if missing and self.verbose:
            print(f"  {run.info.run_name}: tags {[(t.key, target_run.data.tags.get(t.key), t.value) for t in missing]}", flush=True)
        if missing:
            self.target.log_batch(target_run.info.run_id, tags=missing)
            self.counts["tags"] += len(missing)

    def sync_params(self, run, target_run) -> None:
        missing = [Param(key, value) for key, value in run.data.params.items() if key not in target_run.data.params]
        for start in range(0, len(missing), 100):
            self.target.log_batch(target_run.info.run_id, params=missing[start:start + 100])
        self.counts["params"] += len(missing)

    def sync_metrics(self, source: MlflowClient, run, target_run, continuation: bool) -> None:
        """Every point of every metric's history, once. A continuation's re-reported epochs (the same step logged
        again when the stage resumed) are skipped by step."""
        points = []
        for key in run.data.metrics:
            have = self.target.get_metric_history(target_run.info.run_id, key)
            seen = {(m.step, m.timestamp, m.value) for m in have}
            steps = {m.step for m in have}
            for m in source.get_metric_history(run.info.run_id, key):
                if (m.step, m.timestamp, m.value) in seen or (continuation and m.step in steps):
                    continue
                points.append(Metric(key, m.value, m.timestamp, m.step))
        for start in range(0, len(points), BATCH):
            self.target.log_batch(target_run.info.run_id, metrics=points[start:start + BATCH])
        self.counts["metric points"] += len(points)

    def sync_artifacts(self, source: MlflowClient, source_id: str, target_id: str, path: str | None = None) -> None:
        have = {item.path: item for item in self.target.list_artifacts(target_id, path)}
        for item in source.list_artifacts(source_id, path):
            if item.is_dir:
                self.sync_artifacts(source, source_id, target_id, item.path)
            elif item.path not in have or have[item.path].file_size != item.file_size:
                with tempfile.TemporaryDirectory() as tmp:
                    local = source.download_artifacts(source_id, item.path, tmp)
                    folder = str(Path(item.path).parent)
                    self.target.log_artifact(target_id, local, None if folder == "." else folder)
                self.counts["artifacts"] += 1

    def sync_inputs(self, run, target_run) -> None:
        def key(item):
            return item.dataset.name, item.dataset.digest, tuple(sorted((t.key, t.value) for t in item.tags))

        have = {key(item) for item in target_run.inputs.dataset_inputs}
        missing = [DatasetInput(item.dataset, item.tags) for item in run.inputs.dataset_inputs if key(item) not in have]
        if missing:
            self.target.log_inputs(target_run.info.run_id, datasets=missing)
            self.counts["dataset inputs"] += len(missing)

    def sync_models(self, source: MlflowClient, run, target_run, experiment_id: str) -> None:
        """MLflow 3's logged models of this run (artifacts under models/<id>, not in the run's artifacts) and the
        registered versions made from them."""
        steps = {output.model_id: output.step for output in (run.outputs.model_outputs if run.outputs else [])}
        models = [m for m in source.search_logged_models(experiment_ids=[run.info.experiment_id]) if m.source_run_id == run.info.run_id]
        for model in models:
            target_model_id = self.record["models"].get(model.model_id)
            if target_model_id is None:
                created = self.target.create_logged_model(experiment_id, name=model.name, source_run_id=target_run.info.run_id,
                                                          tags={**model.tags, SOURCE_MODEL: model.model_id}, params=model.params,
                                                          model_type=model.model_type)
                with tempfile.TemporaryDirectory() as tmp:
                    from mlflow.artifacts import download_artifacts

                    local = download_artifacts(artifact_uri=model.artifact_location, dst_path=tmp, tracking_uri=source.tracking_uri)
                    self.target.log_model_artifacts(created.model_id, local)
                self.target.finalize_logged_model(created.model_id, LoggedModelStatus.READY)
                target_model_id = self.record["models"][model.model_id] = created.model_id
                self.counts["logged models"] += 1
            outputs = target_run.outputs.model_outputs if target_run.outputs else []
            if model.model_id in steps and not any(o.model_id == target_model_id for o in outputs):
                self.target.log_outputs(target_run.info.run_id, [LoggedModelOutput(target_model_id, steps[model.model_id])])
            self.sync_versions(source, run.info.run_id, model.model_id, target_model_id, target_run.info.run_id)

    def sync_versions(self, source: MlflowClient, run_id: str, model_id: str, target_model_id: str, target_run_id: str) -> None:
        for version in source.search_model_versions(f"run_id = '{run_id}'"):
            if model_id not in (version.model_id, version.source.removeprefix("models:/")):
                continue
            existing = self.target.search_model_versions(f"name = '{version.name}'")
            if any(v.tags.get(SOURCE_MODEL) == model_id for v in existing):
                continue
            try:
                self.target.get_registered_model(version.name)
            except Exception:
                self.target.create_registered_model(version.name)
            self.target.create_model_version(version.name, source=f"models:/{target_model_id}", run_id=target_run_id,
                                             model_id=target_model_id, tags={**version.tags, SOURCE_MODEL: model_id},
                                             description=version.description)
            self.counts["model versions"] += 1

    def sync_status(self, run, target_run, continuation: bool) -> None:
        status, end = run.info.status, run.info.end_time
        if status not in TERMINAL:
            return
        if continuation and target_run.info.end_time and end and target_run.info.end_time >= end:
            return  # the server run ended after this continuation: its status stands
        if target_run.info.status != status or target_run.info.end_time != end:
            self.target.set_terminated(target_run.info.run_id, status=status, end_time=end)
            self.counts["terminated"] += 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder of offline stores (<results>/mlflow-offline)")
    parser.add_argument("target", help="the tracking server, e.g. http://login1:5000")
    parser.add_argument("--verbose", action="store_true", help="say what is copied, run by run")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        raise SystemExit(f"{args.source}: no such folder of offline stores")
    try:
        check_credentials(args.target)
    except CredentialsError as error:
        raise SystemExit(f"hpcdl: {error}") from None
    started = time.monotonic()
    counts = Sync(args.source, args.target, verbose=args.verbose).run()
    added = ", ".join(f"{n} {what}" for what, n in counts.items() if n) or "nothing (already in sync)"
    print(f"hpcdl: synced {args.source} into {args.target} in {time.monotonic() - started:.1f} s: {added}; "
          f"source -> target runs in {args.source / RECORD}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
