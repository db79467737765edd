"""MLflow system metrics on a study run: CPU and memory when the user asks (`system_metrics=true`),
and always on CUDA, where the GPU's utilisation and memory come through pynvml."""

from __future__ import annotations

import contextlib
import logging

from contract import tracking

logger = logging.getLogger(__name__)


def wanted(asked: bool, device: str) -> bool:
    """Whether to log system metrics: asked for, or the run uses a CUDA GPU (`device` auto or cuda*)."""
    if asked:
        return True
    if device not in ("auto",) and not device.startswith("cuda"):
        return False
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def system_metrics(client, run_id: str, asked: bool, device: str = "auto", interval: float = 10.0):
    """Sample system metrics (`system/...`) every `interval` seconds onto run `run_id` while the block runs;
    logs param `system_metrics` (true when they are logged)."""
    on = wanted(asked, device)
    if run_id not in (None, "") and "system_metrics" not in client.get_run(run_id).data.params:
        tracking.log(client, run_id, params={"system_metrics": on})
    if not on:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=client.tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
