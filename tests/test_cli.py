"""The command line: unknown flags and empty --set values are errors, `train --help` names the
command, the Transformer Lab harness's arguments keep working, Ctrl-C never prints a traceback."""
from __future__ import annotations

import json

import pytest

from dllm_trainer import app, cli
from rel_helpers import run_main_in_process


@pytest.fixture
def job_file(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"model_name": "m", "dataset_name": "d", "output_dir": str(tmp_path / "out")}))
    return path


def one_error(code, console) -> str:
    assert code == 2 and "Traceback" not in console, console
    errors = [ln for ln in console.splitlines() if ln.startswith("[dllm-error] ")]
    assert len(errors) == 1, console
    return errors[0]


def test_an_unknown_flag_is_an_error_that_says_how_to_set_the_value(job_file, capfd, no_workers):
    code, console = run_main_in_process(["--config", str(job_file), "--learning_rate", "1e-4"], capfd)
    err = one_error(code, console)
    assert "unknown arguments: --learning_rate 1e-4" in err and "--set learning_rate=1e-4" in err
    code, console = run_main_in_process(["--config", str(job_file), "--bogus"], capfd)
    assert "unknown argument: --bogus; the options are --config FILE.json and --set KEY=VALUE" in one_error(code, console)


def test_set_with_an_empty_value_is_an_error(job_file, capfd, no_workers):
    code, console = run_main_in_process(["--config", str(job_file), "--set", "learning_rate="], capfd)
    assert "--set learning_rate= has no value" in one_error(code, console)


def test_train_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dllm-trainer train ") and "Ctrl-C" in out


def test_a_bad_command_line_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--config"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert err[0].startswith("[dllm-error] ") and "--config" in err[0] and "dllm-trainer train --help" in err[0]


def test_transformer_lab_harness_arguments_keep_working(monkeypatch, capfd):
    """The app's harness leaves its own arguments in sys.argv (tests/lifecycle_harness.py); a newer
    harness may add some: the job runs, with a note, never a refusal."""
    seen = []
    monkeypatch.setattr(app, "_main_tlab", lambda args: seen.append(args) or 0)
    argv = ["--plugin_dir", "/p", "--input_file", "/w/temp/plugin_input_7.json", "--experiment_name", "alpha"]
    assert app.main(argv) == 0 and seen[-1].input_file == "/w/temp/plugin_input_7.json"
    assert app.main([*argv, "--new_harness_flag", "x"]) == 0 and len(seen) == 2
    assert "ignoring arguments this trainer does not use: --new_harness_flag x" in capfd.readouterr().out


def test_ctrl_c_at_any_moment_prints_no_traceback(monkeypatch, capsys):
    import dllm_trainer.app

    def interrupted(argv, prog="main.py"):
        raise KeyboardInterrupt  # e.g. while torch is being imported

    monkeypatch.setattr(dllm_trainer.app, "main", interrupted)
    assert cli.main(["train", "--config", "x.json"]) == 130
    assert capsys.readouterr().err == "[dllm] interrupted\n"


def test_ctrl_c_in_the_plugin_entry_prints_no_traceback(monkeypatch, capfd):
    import dllm_trainer.app

    def interrupted(argv, prog="main.py"):
        raise KeyboardInterrupt

    monkeypatch.setattr(dllm_trainer.app, "main", interrupted)
    code, console = run_main_in_process(["--config", "x.json"], capfd)
    assert code == 130 and console == "[dllm] interrupted\n"
