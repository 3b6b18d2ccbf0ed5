"""Training logs: a progress bar for people, JSON lines for programs, TensorBoard when installed.

Only rank 0 reports. The rich progress bar is used on an interactive terminal; when stdout is not a
TTY or CI=true (log files, CI runners) a bar would fill the log with control codes, so plain lines
are printed every `log_every` steps instead. `metrics.jsonl` always gets one JSON object per logged
step, whatever the terminal.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "use_progress_bar"]


def use_progress_bar() -> bool:
    """A live bar only on an interactive terminal outside CI."""
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return sys.stdout.isatty() and not ci


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class MetricsLogger:
    """Rank-0 sink for per-step records: progress bar / plain lines, metrics.jsonl, TensorBoard."""

    def __init__(self, out_dir: str | Path, max_steps: int, start_step: int, log_every: int,
                 enabled: bool = True, progress_bar: bool | None = None):
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.max_steps = max_steps
        self.start_step = start_step
        self._t0 = time.monotonic()
        self.path = Path(out_dir) / "metrics.jsonl"
        self._bar = None
        self._task = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._tb = self._open_tensorboard(Path(out_dir) / "tb")
        if progress_bar if progress_bar is not None else use_progress_bar():
            self._start_bar(start_step)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines for steps after the checkpoint: they will be logged again."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        self.path.write_text("".join(k + "\n" for k in keep))

    @staticmethod
    def _open_tensorboard(path: Path) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(path))

    def _start_bar(self, start_step: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                             TextColumn("{task.fields[info]}"))
        self._bar.start()
        self._task = self._bar.add_task("train", total=self.max_steps, completed=start_step, info="")

    def message(self, text: str) -> None:
        """A one-off line (warnings about skipped samples, non-finite losses, checkpoints)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def log(self, record: dict[str, Any]) -> None:
        """Record one step; written out every `log_every` steps and at the last step."""
        if not self.enabled:
            return
        step = record["step"]
        if self._bar is not None:
            info = f"loss {_fmt(record.get('loss'))}  {record.get('clips_per_s', 0):.1f} clips/s"
            self._bar.update(self._task, completed=step, info=info)
        if step % self.log_every and step != self.max_steps:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is None:
            shown = "  ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "step")
            print(f"step {step}/{self.max_steps}  {shown}  eta {self.eta(step)}", flush=True)

    def eta(self, step: int) -> str:
        """Remaining time at this logger's average pace so far, as m:ss."""
        done = step - self.start_step
        if done <= 0:
            return "?"
        left = (time.monotonic() - self._t0) / done * (self.max_steps - step)
        return f"{int(left // 60)}:{int(left % 60):02d}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
