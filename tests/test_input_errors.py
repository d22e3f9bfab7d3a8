"""A user's mistake ends in one message and exit 2, never a raw traceback: files that cannot be decoded, a
folder given for a file, a null value, an output path that cannot be a folder, Ctrl-C; a bug keeps its
traceback. Each case goes through the real CLI entry, ``diffusion_dpo.cli.main``."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusion_dpo import checkpointing, cli
from diffusion_dpo.llm import tiny as llm_tiny
from diffusion_dpo.recipes import train
from diffusion_dpo.tiny import write_tiny_pairs

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "diffusion_dpo" / "assets" / "configs" / "tiny.yaml")
LATIN1 = "caf\xe9".encode("latin-1")  # 0xe9 starts a UTF-8 sequence that the next byte does not continue


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of ``diffusion-dpo ARGV`` run in this process."""
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def assert_one_message(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return str(llm_tiny.build_tiny_lm(tmp_path_factory.mktemp("lm") / "model"))


# --------------------------------------------------------------------------------- files that do not decode

def test_a_pair_jsonl_that_is_not_utf8_names_the_file_and_line(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    row = {"caption": "a", "image_0": "a.png", "image_1": "b.png", "label": 0}
    pairs.write_bytes(json.dumps(row).encode() + b"\n" + b'{"caption": "' + LATIN1 + b'"}\n')
    code, err = run_cli(capsys, "score", "scorer.name=shapes", f"data.source={pairs}")
    assert_one_message(code, err, str(pairs), "line 2", "UTF-8")


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.json", "prompts.tsv"])
def test_a_prompt_file_that_is_not_utf8_names_the_file_and_line(tmp_path, capsys, name):
    """label's and grpo's prompt files (one reader, evaluation.prompts) in each of their three forms."""
    prompts = tmp_path / name
    prompts.write_bytes({"prompts.txt": b"a red dog\n" + LATIN1 + b"\n",
                         "prompts.json": b'["a red dog",\n "' + LATIN1 + b'"]',
                         "prompts.tsv": b"Prompt\tCategory\na red dog\tanimals\n" + LATIN1 + b"\tfood\n"}[name])
    code, err = run_cli(capsys, "label", f"prompts={prompts}", f"output_dir={tmp_path / 'out'}")
    assert_one_message(code, err, str(prompts), "line 2" if name != "prompts.tsv" else "line 3", "UTF-8")


def test_a_prompts_column_file_that_is_not_utf8_names_the_file_and_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "a red dog"}\n{"prompt": "' + LATIN1 + b'"}\n')
    code, err = run_cli(capsys, "label", f"prompts={prompts}", "prompts_column=prompt",
                        f"output_dir={tmp_path / 'out'}")
    assert_one_message(code, err, str(prompts), "line 2", "UTF-8")


def test_an_llm_jsonl_that_is_not_utf8_names_the_file_and_line(tmp_path, capsys, lm):
    rows = tmp_path / "pairs.jsonl"
    rows.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "' + LATIN1 + b'"}\n')
    code, err = run_cli(capsys, "llm", "dpo", f"model.name_or_path={lm}", f"data.source={rows}",
                        f"output_dir={tmp_path / 'out'}")
    assert_one_message(code, err, str(rows), "line 2", "UTF-8")


def test_a_config_file_that_is_not_utf8_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_bytes(b"optim:\n  learning_rate: 1.0e-5\n# " + LATIN1 + b"\n")
    code, err = run_cli(capsys, "train", "--config", str(config))
    assert_one_message(code, err, str(config), "line 3", "UTF-8")


@pytest.mark.parametrize("streaming", ["false", "true"])
@pytest.mark.parametrize("damage", ["not_parquet", "truncated"])
def test_a_parquet_file_that_is_not_parquet_or_cut_short_is_named(tmp_path, capsys, damage, streaming):
    folder = tmp_path / "pairs"
    if damage == "truncated":
        shard = next(write_tiny_pairs(folder, n_pairs=4).glob("*.parquet"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        folder.mkdir()
        shard = folder / "a.parquet"
        shard.write_text("caption,jpg_0\n")
    code, err = run_cli(capsys, "score", "scorer.name=shapes", f"data.source={folder}",
                        f"data.streaming={streaming}")
    assert_one_message(code, err, str(shard), "not a readable parquet file")


# ------------------------------------------------------------------------------- a folder where a file goes

def test_a_folder_given_as_the_config_file_is_said_to_be_a_folder(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--config", str(tmp_path))
    assert_one_message(code, err, str(tmp_path), "is a folder; expected a file")
    assert "does not exist" not in err


def test_a_folder_given_as_an_image_file_is_said_to_be_a_folder(tmp_path, capsys):
    code, err = run_cli(capsys, "score", "scorer.name=shapes", "prompt=a large red circle on a blue background", str(tmp_path))
    assert_one_message(code, err, str(tmp_path), "is a folder; expected a file")


# ------------------------------------------------------------------------------------------- null values

def test_a_null_rejected_is_a_null_value_not_a_missing_column(tmp_path, capsys, lm):
    rows = tmp_path / "pairs.jsonl"
    rows.write_text(json.dumps({"prompt": "a", "chosen": "b c", "rejected": "c d"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "b c", "rejected": None}) + "\n")
    code, err = run_cli(capsys, "llm", "dpo", f"model.name_or_path={lm}", f"data.source={rows}",
                        f"output_dir={tmp_path / 'out'}")
    assert_one_message(code, err, str(rows), "row 1", "column 'rejected' is null", "expected a string")
    assert "missing column" not in err


# ---------------------------------------------------------------------------- output paths that cannot be

@pytest.mark.parametrize("command", ["train", "llm dpo", "label"])
def test_an_output_dir_that_is_a_file_is_named(tmp_path, capsys, lm, command):
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder\n")
    args = {"train": ["--config", TINY], "llm dpo": [f"model.name_or_path={lm}"],
            "label": ["model.pretrained=tiny"]}[command]
    code, err = run_cli(capsys, *command.split(), *args, f"output_dir={a_file}")
    assert_one_message(code, err, f"output_dir {a_file}", "is a file; expected a folder")
    code, err = run_cli(capsys, *command.split(), *args, f"output_dir={a_file / 'run'}")
    assert_one_message(code, err, f"{a_file} is a file; expected a folder")


def test_an_output_dir_whose_name_is_too_long_is_named(tmp_path, capsys):
    too_long = tmp_path / ("a" * 300)
    code, err = run_cli(capsys, "train", "--config", TINY, f"output_dir={too_long}")
    assert_one_message(code, err, str(too_long), "the name is too long")


def test_a_score_output_that_is_a_folder_fails_before_scoring(tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    code, err = run_cli(capsys, "score", "scorer.name=shapes", "prompt=a large red circle on a blue background", str(image),
                        f"output={tmp_path}")
    assert_one_message(code, err, f"output': {tmp_path} is a folder")
    a_file = tmp_path / "taken"
    a_file.write_text("")
    code, err = run_cli(capsys, "score", "scorer.name=shapes", "prompt=a large red circle on a blue background", str(image),
                        f"output={a_file / 'scores.tsv'}")
    assert_one_message(code, err, f"{a_file} is a file; expected a folder")


# ------------------------------------------------------------------------ the handler: codes, tracebacks

def failing_main(error: BaseException):
    def main(argv):
        raise error
    return main


def test_the_handler_turns_errors_into_codes_and_keeps_a_bugs_traceback(monkeypatch, capsys):
    from diffusion_dpo.errors import InputError, RunError

    monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)
    for error, code, message in ((InputError("bad key"), 2, "diffusion-dpo train: bad key"),
                                 (RunError("loss NaN"), 1, "diffusion-dpo train: stopped: loss NaN"),
                                 (KeyboardInterrupt(), 130,
                                  "diffusion-dpo train: interrupted; continue with resume=auto")):
        monkeypatch.setattr(train, "main", failing_main(error))
        got, err = run_cli(capsys, "train")
        assert (got, err.strip()) == (code, message)
    monkeypatch.setattr(train, "main", failing_main(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        cli.main(["train"])

    monkeypatch.setenv(cli.TRACEBACK_VARIABLE, "1")
    monkeypatch.setattr(train, "main", failing_main(InputError("bad key")))
    code, err = run_cli(capsys, "train")
    assert code == 2 and "Traceback" in err and err.rstrip().endswith("diffusion-dpo train: bad key")


def test_a_command_leaves_no_process_group_behind_whether_it_succeeds_or_fails(monkeypatch, capsys):
    """Left to interpreter exit, a gloo group's threads can abort a finished run (exit -6): the handler destroys
    the group a command formed, on success and on a handled error alike."""
    import torch.distributed as dist

    from diffusion_dpo.engine.sharding import ensure_process_group
    from diffusion_dpo.errors import InputError

    def forms_a_group(error):
        def main(argv):
            ensure_process_group()
            assert dist.is_initialized()
            if error:
                raise error
        return main

    for error, code in ((None, 0), (InputError("bad key"), 2)):
        monkeypatch.setattr(train, "main", forms_a_group(error))
        assert run_cli(capsys, "train")[0] == code
        assert not dist.is_initialized()


@pytest.mark.slow
def test_ctrl_c_during_training_prints_one_line_and_resume_auto_continues(tmp_path):
    """A real ``python -m diffusion_dpo train`` on the tiny config, sent SIGINT once it has saved a checkpoint.
    The child starts with SIGINT at its default, as from a shell: an earlier test of the suite can leave the
    pytest process ignoring it, and a child inherits an ignored SIGINT (Python then never raises Ctrl-C)."""
    steps = 30
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(cli.TRACEBACK_VARIABLE, None)
    args = [sys.executable, "-m", "diffusion_dpo", "train", "--config", TINY, f"output_dir={out}",
            "optim.batch_size=2", f"optim.max_steps={steps}", "log_every=1", "checkpoint_every=1", "tensorboard=false"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while proc.poll() is None and not checkpointing.complete_checkpoints(out):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    # A progress bar redraws its line with carriage returns; the message is the one line after it.
    assert err.splitlines()[-1] == "diffusion-dpo train: interrupted; continue with resume=auto", err[-500:]
    assert len([line for line in err.splitlines() if "interrupted" in line]) == 1

    done = subprocess.run(args + ["resume=auto"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["resumed_from"], summary
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))


def test_an_output_dir_without_write_permission_is_named_before_anything_is_made(tmp_path, capsys, monkeypatch):
    """Root may write anywhere, so the permission is taken away where the package asks for it."""
    import diffusion_dpo.fileio

    real_access = os.access
    monkeypatch.setattr(diffusion_dpo.fileio.os, "access",
                        lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    code, err = run_cli(capsys, "train", "--config", TINY, f"output_dir={tmp_path / 'run'}")
    assert_one_message(code, err, f"output_dir {tmp_path / 'run'} cannot be created: permission denied on "
                       f"{tmp_path}")
    assert not (tmp_path / "run").exists()


def test_an_immutable_output_dir_is_named(tmp_path, capsys):
    """``chattr +i`` (root with CAP_LINUX_IMMUTABLE on a filesystem that has the flag; skipped elsewhere)."""
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    if subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        for out, why in ((frozen, "cannot be written into"), (frozen / "run", "cannot be created")):
            code, err = run_cli(capsys, "train", "--config", TINY, f"output_dir={out}")
            assert_one_message(code, err, f"output_dir {out} {why}: permission denied on {frozen}")
    finally:
        subprocess.run(["chattr", "-i", str(frozen)], check=True)
