"""The `clipforge` command dispatcher: one module per sub-command, imported only when it runs."""
import subprocess
import sys

import pytest

from clipforge import cli


def test_every_command_has_a_module_with_the_cli_interface():
    import importlib

    for name, (module, _) in cli.COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run), name


def test_top_level_help_lists_commands_without_importing_them():
    code = (
        "import sys; from clipforge import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('deepspeed', 'nvidia.dali', 'clipforge.train', 'clipforge.train.plan') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in cli.COMMANDS:
        assert name in out.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_sub_command_help_shows_its_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--help"])
    assert e.value.code == 0
    assert "--gpus" in capsys.readouterr().out
