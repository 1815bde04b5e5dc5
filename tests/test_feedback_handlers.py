"""Run feedback (scripts/handlers/progress.py, scripts/known_warnings.py): the loss from the first iteration, a
progress bar with the loss, one summary line naming what was written, known third-party notices once."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from scripts.handlers.progress import ProgressBar, RunSummary, log_every, stderr_is_terminal
from scripts.known_warnings import KNOWN_LOGGERS, OncePerMessage, register


def test_log_every_logs_the_first_iteration_then_every_interval() -> None:
    logged = [i for i in range(1, 13) if log_every(5)(None, i)]
    assert logged == [1, 5, 10]
    with pytest.raises(ValueError, match="log_interval must be a positive integer, got 0"):
        log_every(0)


def test_the_bar_is_off_where_stderr_is_not_a_terminal() -> None:
    assert stderr_is_terminal() is False  # pytest captures stderr


def test_summary_names_each_output_and_one_not_written(tmp_path: Path, caplog) -> None:
    (tmp_path / "model.pt").touch()
    engine = Engine(lambda engine, batch: {"loss": torch.tensor(0.5)})
    RunSummary({"model": tmp_path / "model.pt", "encoder": tmp_path / "encoder.pt"}, name="training").attach(engine)
    ProgressBar().attach(engine)
    with caplog.at_level(logging.INFO, logger="scripts.handlers.progress"):
        engine.run([0, 1, 2], max_epochs=2)
    assert caplog.messages.count(f"training finished: 2 epoch(s), 6 iteration(s); model {tmp_path / 'model.pt'}, "
                                     f"encoder not written ({tmp_path / 'encoder.pt'})") == 1


def test_known_notices_are_shown_once_and_registering_twice_adds_nothing(caplog) -> None:
    register()
    register()
    logger = logging.getLogger(KNOWN_LOGGERS[0])
    assert sum(isinstance(f, OncePerMessage) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=KNOWN_LOGGERS[0]):
        for _ in range(3):
            logger.warning("a notice repeated by every reader (test)")
        logger.warning("another notice (test)")
    assert caplog.messages == ["a notice repeated by every reader (test)", "another notice (test)"]
    with warnings.catch_warnings(record=True) as caught:
        register()  # inside catch_warnings, which resets the filters
        for line in range(3):
            warnings.warn_explicit("NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register "
                                   "successfully.", UserWarning, f"reader_{line}.py", line)
    assert len(caught) == 1
