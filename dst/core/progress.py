"""A progress line for long cells, clean in JupyterLab, in papermill's executed notebook and in a terminal.

tqdm's text bar leaves an empty stderr strip per bar in JupyterLab (``leave=False``) and one
saved line per refresh in papermill's output. Here, inside a Jupyter kernel, the line is one
display output updated in place (``display_id``), so the notebook keeps exactly one line per
loop, its final state; elsewhere it is tqdm's bar on stderr.
"""

import time

from tqdm import tqdm


def in_jupyter_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (JupyterLab, VS Code, Colab, papermill)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return any(cls.__name__ == "ZMQInteractiveShell" for cls in type(shell).__mro__)


class Progress:
    """``with Progress(total, "train") as bar: ... bar.update(n, note)``: a count, a rate and a note, one line."""

    def __init__(self, total: int | None, description: str, enabled: bool = True, min_interval: float = 1.0):
        self.total, self.description, self.min_interval = total, description, min_interval
        self.done, self.note = 0, ""
        self.started = self.shown = time.perf_counter()
        self._handle = self._bar = None
        if not enabled:
            return
        if in_jupyter_kernel():
            from IPython.display import display

            self._handle = display(self._text(), display_id=True)
        else:
            self._bar = tqdm(total=self.total, desc=description, leave=False, mininterval=min_interval)

    def update(self, count: int = 1, note: str = "") -> None:
        """Count ``count`` more items done; ``note`` says what is going on (shown after the count)."""
        self.done += count
        self.note = note or self.note
        if self._bar is not None:
            self._bar.update(count)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
        elif self._handle is not None and time.perf_counter() - self.shown >= self.min_interval:
            self._handle.update(self._text())
            self.shown = time.perf_counter()

    def close(self) -> None:
        """Show the final count and time (Jupyter) or remove the bar (terminal)."""
        if self._bar is not None:
            self._bar.close()
        elif self._handle is not None:
            self._handle.update(self._text(final=True))
        self._handle = self._bar = None

    def _text(self, final: bool = False):
        from IPython.display import Pretty

        seconds = time.perf_counter() - self.started
        state = f"done in {seconds:.0f} s" if final else f"{seconds:.0f} s"
        note = f" ({self.note})" if self.note and not final else ""
        count = f"{self.done}" if self.total is None else f"{self.done}/{self.total}"
        return Pretty(f"{self.description}: {count}{note}, {state}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
