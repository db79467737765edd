"""Settings and fixtures shared by every test module.

The real-server fixtures of servers.py are imported here so that the whole session shares one moto S3
server (a module that imports a fixture itself gets an instance of its own).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402  (after the offline settings, before anything imports the hub libraries)
from servers import lab_server, moto_s3, postgres_db  # noqa: E402, F401  (fixtures)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests: tiny models only lose time to more threads, and the
    test machine is shared. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tracked_runs():
    """A function (client, kind, status=None) -> the runs tagged prunetrack.kind=<kind> (of one status, or
    any) in every experiment of the store, oldest first."""

    def find(client, kind: str, status: str | None = None) -> list:
        query = f"tags.`prunetrack.kind` = '{kind}'" + (f" and attributes.status = '{status}'" if status else "")
        experiments = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(experiments, query, order_by=["attributes.start_time ASC"])

    return find


@pytest.fixture(scope="module")
def scratch_cwd(tmp_path_factory):
    """A module's tests run in a temporary folder: in-process runs' artifacts (MLflow's default
    ./mlruns, ./mlflow.db) land there, not in the repository."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(cwd)
