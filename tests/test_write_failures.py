"""A failed write is one line naming the path; a full disk, quota or size limit also gives the bytes needed and free."""

import errno
import os
import resource
import signal

import pytest
import torch

from opd_local.write_failures import WriteFailed, tensor_bytes, write_failure, writing


def test_each_writers_words_for_no_room_are_read_as_such(tmp_path):
    target = tmp_path / "checkpoints" / "step-000001"
    # OSError (plain writes), safetensors' io::Error text, torch's zip writer (which only says it stopped short)
    for err, words in [
        (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk quota is used up"),
        (Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"), "the disk is full"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4240"), "the disk is full"),
    ]:
        failure = write_failure(err, target, "the checkpoint of step 1", need_bytes=10**18)  # more than any disk has free
        assert isinstance(failure, WriteFailed)
        assert str(failure).startswith(f"cannot write the checkpoint of step 1 to {target}: {words}; it needs about "), failure
        assert "are free on its disk" in str(failure)


def test_a_short_torch_write_with_room_to_spare_is_not_called_a_full_disk(tmp_path):
    failure = write_failure(RuntimeError("unexpected pos 64 vs 0"), tmp_path / "x", "the model", need_bytes=1)
    assert "the write stopped short" in str(failure) and "full" not in str(failure)


def test_an_error_that_is_no_write_failure_passes_through(tmp_path):
    assert write_failure(ZeroDivisionError("a bug"), tmp_path / "x", "the model", 1) is None
    with pytest.raises(ZeroDivisionError):
        with writing(tmp_path / "x", "the model", temporary=tmp_path / "tmp"):
            raise ZeroDivisionError


def test_a_real_write_past_a_file_size_limit_names_the_path_and_removes_the_temporary(tmp_path):
    from safetensors.torch import save_file

    tmp = tmp_path / ".target.tmp"
    tmp.mkdir()
    tensors = {"w": torch.zeros(256, 1024)}  # 1 MiB
    limit, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limit[1]))
    try:
        with pytest.raises(WriteFailed, match=r"cannot write the weights to .*target: a file-size limit \(ulimit -f\) was reached; it needs about 1\.0 MiB") as caught:
            with writing(tmp_path / "target", "the weights", tensor_bytes(tensors), temporary=tmp):
                save_file(tensors, str(tmp / "model.safetensors"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert caught.value.errno == errno.EFBIG
    assert not tmp.exists() and not os.path.exists(tmp_path / "target")
