"""A checkpoint save that cannot write (disk full, file too large, read-only folder): the previous checkpoint
stays intact and loadable, nothing half-written is left, and the error names the file it could not write."""

import errno
import os
import resource
import signal
import stat

import pytest
import torch

from diffusion_dpo import checkpointing as ck
from diffusion_dpo.errors import InputError


def _save(out, step, weights):
    return ck.save_checkpoint(out, step, trainable=weights, training_state={"lr": 0.5 * step},
                              rank_state={"rng": ck.capture_rng_state(), "data": {"position": step}}, keep=2)


def _assert_step_1_intact(out, weights):
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]  # no .tmp left behind
    assert ck.latest_checkpoint(out).name == "step-1"
    state = ck.load_checkpoint(out / "checkpoints" / "step-1")
    assert state["step"] == 1 and state["training_state"] == {"lr": 0.5}
    assert state["rank_state"]["data"] == {"position": 1}
    assert torch.equal(state["trainable"]["w"], weights["w"])


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    step_1 = {"w": torch.arange(6.0).reshape(2, 3)}
    _save(tmp_path, 1, step_1)
    real_save = torch.save

    def disk_full_on_training_state(obj, path, *args, **kwargs):
        if str(path).endswith("training_state.pt"):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a zip")  # what a full disk leaves: the start of the file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_training_state)
    with pytest.raises(InputError) as caught:
        _save(tmp_path, 2, {"w": torch.ones(2, 3)})
    message = str(caught.value)
    assert str(tmp_path / "checkpoints" / "step-2.tmp" / "training_state.pt") in message
    assert "No space left on device" in message and "step-1" in message and "resume=auto" in message
    _assert_step_1_intact(tmp_path, step_1)

    # Space freed: the next save works and prunes as usual.
    monkeypatch.setattr(torch, "save", real_save)
    _save(tmp_path, 2, {"w": torch.ones(2, 3)})
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step-1", "step-2"]


@pytest.mark.parametrize("limit, victim, reason", [
    (1000, "rank-0.pt", "unexpected pos"),  # torch.save reports it as a bare RuntimeError
    (64_000, "trainable.safetensors", "File too large"),  # safetensors as a SafetensorError
])
def test_a_real_failed_write_names_the_file(tmp_path, limit, victim, reason):
    """The kernel refuses writes past RLIMIT_FSIZE (EFBIG), as it refuses them on a full disk (ENOSPC):
    the libraries' own errors, not a patched one, become an InputError naming the file."""
    step_1 = {"w": torch.arange(6.0).reshape(2, 3)}
    _save(tmp_path, 1, step_1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default action would end the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(InputError, match=rf"cannot write \S*step-2.tmp/{victim}: .*{reason}"):
            _save(tmp_path, 2, {"w": torch.zeros(100_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    _assert_step_1_intact(tmp_path, step_1)


def test_read_only_checkpoints_folder(tmp_path):
    step_1 = {"w": torch.arange(6.0).reshape(2, 3)}
    _save(tmp_path, 1, step_1)
    folder = tmp_path / "checkpoints"
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(folder, os.W_OK):  # root ignores permissions: the ENOSPC test above covers this path
            pytest.skip("running as root: a read-only folder is still writable")
        with pytest.raises(InputError, match=r"cannot write \S*step-2.tmp: Permission denied"):
            _save(tmp_path, 2, {"w": torch.ones(2, 3)})
    finally:
        folder.chmod(stat.S_IRWXU)
    _assert_step_1_intact(tmp_path, step_1)


def test_a_lone_old_copy_from_an_interrupted_resave_counts_and_is_not_pruned(tmp_path):
    """Killed between the two renames of a re-save, step-2 exists only as step-2.old (and a complete
    step-2.tmp): that copy is what resume=auto takes, pruning keeps it, and the next save of step 2 ends it."""
    _save(tmp_path, 1, {"w": torch.zeros(3)})
    _save(tmp_path, 2, {"w": torch.ones(3)})
    root = tmp_path / "checkpoints"
    os.replace(root / "step-2", root / "step-2.old")
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step-1", "step-2.old"]
    assert torch.equal(ck.load_checkpoint(ck.latest_checkpoint(tmp_path))["trainable"]["w"], torch.ones(3))
    assert ck.prune_checkpoints(tmp_path, keep=None) == []
    _save(tmp_path, 3, {"w": torch.full((3,), 3.0)})  # keep=2: step-1 goes, the old copy of step 2 stays
    assert sorted(p.name for p in root.iterdir()) == ["step-2.old", "step-3"]
    _save(tmp_path, 2, {"w": torch.full((3,), 2.0)})
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]
    assert torch.equal(ck.load_checkpoint(root / "step-2")["trainable"]["w"], torch.full((3,), 2.0))
