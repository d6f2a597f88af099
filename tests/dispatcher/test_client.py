"""What the volt command prints of what a tested commit wrote."""

from __future__ import annotations

from dispatcher.client import terminal_safe


def test_a_log_shown_on_a_terminal_keeps_colours_and_lines_and_nothing_else_that_steers_it() -> None:
    log = (
        "\x1b[32mPASSED\x1b[0m\tt::a\n"  # colours, tabs, newlines: as they are
        "secret\r\x1b[2Kall good\n"  # back to the line's start and erase it: shown, not done
        "\x1b]52;c;c2VjcmV0\x07"  # OSC 52: would set the reader's clipboard
        "\x1b[3A\x1b]0;title\x07\x9b1m"  # up three lines, the window's title, an 8-bit CSI
    )
    assert terminal_safe(log) == (
        "\x1b[32mPASSED\x1b[0m\tt::a\n"
        "secret\\r\\x1b[2Kall good\n"
        "\\x1b]52;c;c2VjcmV0\\x07"
        "\\x1b[3A\\x1b]0;title\\x07\\x9b1m"
    )
