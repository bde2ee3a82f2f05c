"""The command line refuses what would hang or break the service, saying why."""

import pytest

from cli.main import build_parser


@pytest.mark.parametrize("argv", [["demo", "--workers", "0"], ["up", "--workers", "0"],
                                  ["serve", "api", "--workers", "-1"],
                                  ["bench", "api", "--workers", "0"]])
def test_process_counts_below_one_are_refused(argv, capsys):
    """`demo --workers 0` started no worker and waited for its jobs forever."""
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(argv)
    assert stop.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_process_counts_of_one_or_more_are_taken():
    assert build_parser().parse_args(["demo", "--workers", "2"]).workers == 2
    assert build_parser().parse_args(["up"]).workers == 1
