"""What every test of a CLI error checks: the command exits cleanly (no traceback escaped it), with
status 2 and exactly one `error:` line (short enough to read)."""

from __future__ import annotations

from typer.testing import CliRunner, Result

from evl.cli import app

runner = CliRunner()


def invoke(args: list) -> Result:
    """Run `evl ARGS`; whatever happened, no traceback escaped the command."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (repr(result.exception), result.output)
    return result


def error_line(result: Result) -> str:
    """The one `error:` line of a command that exited with status 2."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    assert len(lines[0]) < 600, lines[0][:600]
    return lines[0]
