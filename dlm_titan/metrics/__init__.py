"""Training metrics: the per-step component the Trainer calls (train_metrics.py), its sinks (sinks.py: console
line, TensorBoard, W&B), throughput, MFU and memory (throughput.py) and the loss by noise level
(loss_by_time.py). Every rank computes the metrics (some need all-reduces); only rank 0 prints and writes them.
"""

from dlm_titan.metrics.loss_by_time import T_BUCKET_PREFIX, LossByTimeBins, bucket_means
from dlm_titan.metrics.sinks import TB_TAGS, MetricsLogger
from dlm_titan.metrics.throughput import (
    ThroughputWindow,
    device_memory,
    device_name,
    mfu,
    model_flops_per_token,
)
from dlm_titan.metrics.train_metrics import LoggedStep, TrainMetrics

__all__ = [
    "T_BUCKET_PREFIX", "TB_TAGS", "LoggedStep", "LossByTimeBins", "MetricsLogger", "ThroughputWindow", "TrainMetrics",
    "bucket_means", "device_memory", "device_name", "mfu", "model_flops_per_token",
]
