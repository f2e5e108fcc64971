"""Live progress of a simulation: a rich bar per cloud round, or plain lines when piped.

Fed history rows as the metrics topics deliver them; prints, never decides.
"""

from __future__ import annotations

import sys
from typing import Any

from .report import human_bytes


def round_line(row: dict[str, Any], rounds: int) -> str:
    """One cloud round in one line: what a log or a CI job shows."""
    acc = row.get("accuracy")
    online = row.get("online")
    parts = [
        f"round {row['round']}/{rounds}",
        f"accuracy {acc:.4f}" if acc is not None else "accuracy -",
        f"participation {100 * row.get('participation', 0):.0f}%",
        f"online {100 * online:.0f}%" if online is not None else "",
        f"updates {row.get('device_updates', 0)}",
        f"up {human_bytes(row.get('bytes_up_device'))}",
        f"rejected {row.get('rejected', 0)}" if row.get("rejected") else "",
        f"{row.get('elapsed_s') or 0:.1f} s",
    ]
    return "  ".join(p for p in parts if p)


class ProgressView:
    """A context manager: ``update(row)`` per cloud round, ``note(text)`` for events."""

    def __init__(self, rounds: int, *, plain: bool, title: str = "", quiet: bool = False) -> None:
        self.rounds = rounds
        self.plain = plain or quiet
        self.quiet = quiet
        self.title = title
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressView:
        if self.plain:
            if self.title and not self.quiet:
                print(self.title, flush=True)
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self._bar = Bar(
            TextColumn("[bold]cloud rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self._bar.__enter__()
        if self.title:
            self._bar.console.print(self.title)
        self._task = self._bar.add_task("rounds", total=self.rounds, detail="starting the fleet")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def update(self, row: dict[str, Any]) -> None:
        if self._bar is None:
            if not self.quiet:
                print(round_line(row, self.rounds), flush=True)
            return
        acc = row.get("accuracy")
        detail = (
            f"acc {acc:.3f}  " if acc is not None else ""
        ) + f"participation {100 * row.get('participation', 0):.0f}%"
        self._bar.update(self._task, completed=row["round"], detail=detail)

    def note(self, text: str) -> None:
        if self._bar is None:
            if not self.quiet:
                print(text, flush=True)
        else:
            self._bar.update(self._task, detail=text)

    @property
    def console(self) -> Any:
        return None if self._bar is None else self._bar.console


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
