"""The tasks the data step launches carry the step's own placement: on a cluster they must run on
the data image's nodes (`data_node`), like the step itself (pipelines/dag.py _task_options)."""

import pytest

from pipelines.config import CONFIG_DIR, load_config
from steps.data import shuffle as sh
from steps.data import step_resources


@pytest.fixture
def restore_options():
    saved = dict(sh.TASK_OPTIONS)
    yield
    sh.TASK_OPTIONS.clear()
    sh.TASK_OPTIONS.update(saved)


def test_7b_data_tasks_ask_for_the_data_node_resource(restore_options):
    cfg = load_config(CONFIG_DIR / "7b.yaml")
    resources = step_resources(cfg.run)
    assert resources == dict(cfg.run.resources["data"].resources) and resources.get("data_node", 0) > 0
    sh.configure(cfg.data.cpus_per_task, resources)
    for num_returns in (1, 3, "streaming"):  # shuffles, multi-output reduces, the streaming reader
        opts = sh.task_options(num_returns)
        assert opts["resources"] == resources and opts["num_cpus"] == cfg.data.cpus_per_task
        assert opts["num_returns"] == num_returns


def test_tiny_data_tasks_ask_for_cpus_only(restore_options):
    cfg = load_config(None)
    assert step_resources(cfg.run) == {}
    sh.configure(0.5, step_resources(cfg.run))
    assert sh.task_options(2) == {"num_returns": 2, "num_cpus": 0.5}


def test_configure_replaces_earlier_resources(restore_options):
    sh.configure(1.0, {"data_node": 0.01})
    sh.configure(1.0, None)  # a later run in the same process on a plain local cluster
    assert "resources" not in sh.task_options()
