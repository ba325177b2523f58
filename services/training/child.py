"""The training process: one per job attempt, spawned by the worker.

It runs ``services.training.ml.train.train`` and reports back through a queue, so the
worker's event loop keeps heartbeating, cancelling and relaying events while torch works:
the job's events as training says them (``events.JobStarted``, ``BatchProgress``,
``EpochCompleted``), then one last message, the ``TrainResult`` or an ``Ended``.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing.synchronize
import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.queues import Queue

_PR_SET_PDEATHSIG = 1
CANCELLED, PRUNED, TRANSIENT, FAILED = "cancelled", "pruned", "transient", "failed"


@dataclass(frozen=True)
class Ended:
    """How the training process ended when it has no result to give."""

    outcome: str  # CANCELLED, PRUNED, TRANSIENT (MLflow unreachable: retry later) or FAILED
    message: str
    epoch: int = 0  # pruned: the last epoch trained
    value: float = 0.0  # pruned: its objective


def _die_with_parent(parent: int) -> None:
    # A worker killed with SIGKILL must not leave its training running (and logging) alone.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:
        os._exit(1)


def run(
    spec: object,
    events: Queue,
    stop: multiprocessing.synchronize.Event,
    threads: int,
    parent: int,
) -> None:
    """Entry point of the spawned process; every outcome ends with one message on ``events``."""
    _die_with_parent(parent)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s training: %(message)s"
    )
    import torch

    from services.training.ml.train import Cancelled, Pruned, TransientError, train

    torch.set_num_threads(threads)
    try:
        result = train(spec, events.put, stop.is_set)
    except Cancelled:
        events.put(Ended(CANCELLED, "cancelled"))
    except Pruned as exc:
        events.put(Ended(PRUNED, str(exc), exc.epoch, exc.value))
    except TransientError as exc:
        events.put(Ended(TRANSIENT, str(exc)))
    except Exception as exc:  # reported to the worker, which fails the job with this message
        logging.exception("training failed")
        events.put(Ended(FAILED, f"{type(exc).__name__}: {exc}"))
    else:
        events.put(result)
