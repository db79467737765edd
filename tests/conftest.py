"""Settings and fixtures shared by every test module.

The real-server fixtures of servers.py are imported here so that the whole session shares one moto S3
server (a module that imports a fixture itself gets an instance of its own). Plain helpers (tiny models,
the character tokenizer, `runs`) are in helpers.py.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402  (after the offline settings, before anything imports the hub libraries)
from helpers import copy_store, save_tiny  # noqa: E402
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


@pytest.fixture(scope="module")
def scratch_cwd(tmp_path_factory):
    """A module's tests run in a temporary folder: in-process runs' artifacts (MLflow's default
    ./mlruns, ./mlflow.db) land there, not in the repository."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(cwd)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A function (family="llama", layers=4, **config) -> the folder of `helpers.save_tiny(...)`, a tiny
    random model with the character tokenizer saved like a hub checkpoint; made once per session for each
    set of arguments. Read-only: tests share it."""
    made = {}

    def make(family: str = "llama", layers: int = 4, **config) -> str:
        key = (family, layers, tuple(sorted(config.items())))
        if key not in made:
            made[key] = save_tiny(tmp_path_factory.mktemp(f"tiny-{family}"), family, layers, **config)
        return made[key]

    return make


@pytest.fixture(scope="session")
def store_template(tmp_path_factory):
    """An empty SQLite tracking store with MLflow's schema, made once (creating one takes seconds, a copy
    does not); copy it with `helpers.copy_store`, never write to it."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("store-template")
    cwd = os.getcwd()
    os.chdir(folder)  # experiment 0 keeps its artifacts under the folder the store was created in
    try:
        MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()
    finally:
        os.chdir(cwd)
    return folder / "mlflow.db"


@pytest.fixture
def sqlite_store(store_template, tmp_path):
    """(uri, client) of a fresh SQLite tracking store at tmp_path/mlflow.db."""
    return copy_store(store_template, tmp_path / "mlflow.db")


MEASURED: list[str] = []  # lines the `measured` fixture adds, shown at the end of the run


@pytest.fixture
def measured():
    """A function that records a measurement line (e.g. the soak test's worst takeover time); `make test` shows
    them in a section of its own at the end."""
    return MEASURED.append


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured")
        for line in MEASURED:
            terminalreporter.write_line(line)
