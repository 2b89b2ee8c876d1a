"""Assertions shared by the command-line tests (imported by tests/test_cli*.py)."""


def exit_status(main, argv) -> int:
    """``main(argv)``'s exit status, whether returned or raised by the parser."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def one_error_line(capsys) -> str:
    """stderr, checked to be one ``error: ...`` line with no traceback."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err
