"""Bars only where a person watches: on a terminal (or when asked), never in a log or a pipe."""
import io
import sys

from vitkit.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_auto_draws_a_bar_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = progress_bar(3, "eval")
    bar.update(3)
    bar.close()
    assert sys.stderr.getvalue() == ""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress_bar(3, "eval")
    bar.update(3)
    bar.close()
    assert "eval:" in terminal.getvalue() and "/3 " in terminal.getvalue()  # tqdm throttles redraws: 0/3 at least


def test_plain_and_other_ranks_never_draw(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    for bar in (progress_bar(3, "eval", "plain"), progress_bar(3, "eval", "bar", enabled=False)):
        bar.update(3)
        bar.close()
    assert terminal.getvalue() == ""
