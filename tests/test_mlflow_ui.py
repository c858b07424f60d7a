"""What a user sees when they open the link a stage prints: MLflow's UI in its "Model training" mode, on the classic
runs table, with the workflow's parent run expanding into one child per stage, each named by its role. Checked in a
real headless chromium (Debian's) against `mlflow server` on the default pipeline's store; a screenshot is kept in
the pipeline's results folder (ui-runs-table.png)."""

from __future__ import annotations

import re

import pytest

from test_workflow import STAGES


@pytest.mark.slow
def test_the_printed_link_opens_the_runs_table_in_model_training_mode(pipeline, mlflow_ui, browser_page):
    results, run = pipeline
    (link,) = set(re.findall(r"runs table: (\S+)", run.stdout + run.stderr))
    url = mlflow_ui(f"sqlite:///{results}/mlflow.db", results / "mlartifacts")
    page = browser_page()
    page.goto(link.replace("http://127.0.0.1:5000", url))

    parent = page.get_by_role("link", name="workflow", exact=True)
    parent.wait_for(timeout=60_000)
    assert page.locator("h2").first.inner_text().strip() == "Runs", "the classic runs table, not GenAI's 'Training runs'"
    navigation = page.get_by_role("link").all_inner_texts()
    assert "Model registry" in navigation and "Prompts" not in navigation, f"Model training mode: {navigation}"

    # The parent row's expander shows the stages nested under it.
    row = page.locator('[col-id="attributes.`Run Name`"]').filter(has=parent)
    row.locator("button").first.click()
    for name in STAGES:
        page.get_by_role("link", name=name, exact=True).wait_for(timeout=30_000)
    page.screenshot(path=str(results / "ui-runs-table.png"), full_page=True)
