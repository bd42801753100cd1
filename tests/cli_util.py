"""Run the real console entry point in-process and capture what a user would see."""

from __future__ import annotations

import sys

import pytest


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    from branchmerge.cli.main import main

    old = sys.argv
    sys.argv = ["branchmerge", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err
