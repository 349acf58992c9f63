"""Checks shared by the command-line tests."""


def assert_one_line_error(code, err, *needles):
    """Exit code 2, one line on stderr (no traceback) that contains every needle."""
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
