"""TensorBoard's event records get a compiled CRC-32C: the same bytes on disk as with its pure-Python checksum."""

from __future__ import annotations

import glob

import numpy as np
import pytest
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.summary.writer import record_writer

from lightning_lens import loggers

google_crc32c = pytest.importorskip("google_crc32c")


def test_the_fast_checksum_equals_tensorboards_and_is_installed_once():
    assert loggers.fast_tensorboard_checksums() is (google_crc32c.implementation == "c")
    if google_crc32c.implementation != "c":
        pytest.skip("google-crc32c without its compiled extension: TensorBoard's checksum is kept")
    fast, slow = record_writer.masked_crc32c, pywrap_tensorflow.masked_crc32c
    assert fast is not slow
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 64, 1000, 4099):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert fast(data) == slow(data)
    assert loggers.fast_tensorboard_checksums() and record_writer.masked_crc32c is fast  # not wrapped twice


def test_event_files_written_with_the_fast_checksum_read_back(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Trainer:  # what the sinks read of a trainer
        is_global_zero = True
        global_step = 3

        def __init__(self, logger):
            self.loggers = [logger]

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    loggers.log_image(Trainer(logger), "check/image", image, step=3)
    logger.experiment.flush()
    (path,) = glob.glob(f"{logger.log_dir}/events.out.tfevents.*")
    # every record's checksums verified by TensorBoard's own (pure-Python) reader
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    reader = PyRecordReader_New(path)
    records = 0
    while True:
        try:
            reader.GetNext()
        except Exception as err:  # end of file
            assert "EOF" in type(err).__name__ or "OutOfRange" in type(err).__name__, err
            break
        records += 1
    assert records >= 2
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    (entry,) = events.Images("check/image")
    assert (entry.width, entry.height) == (60, 40)
