"""Textual messages that carry the runner's notifications into the dashboard."""

from __future__ import annotations

from textual.message import Message

from vqabench.events import Progress
from vqabench.runner import Notification, WorkerEvent


class RunnerNotice(Message):
    """One runner notification (vqabench.runner), delivered on the app's message queue."""

    def __init__(self, note: Notification) -> None:
        super().__init__()
        self.note = note


class ProgressNotice(RunnerNotice):
    """A progress event; a burst of them for one run collapses into the latest."""

    def __init__(self, note: WorkerEvent) -> None:
        super().__init__(note)
        self.note: WorkerEvent = note

    def can_replace(self, message: Message) -> bool:
        # Textual asks the queued message whether the next one supersedes it: a newer
        # progress report of the same run does, so a backlog costs one redraw, not many.
        return isinstance(message, ProgressNotice) and message.note.run == self.note.run


def notice_for(note: Notification) -> RunnerNotice:
    """The message that carries `note`: progress events may be coalesced, nothing else is."""
    if isinstance(note, WorkerEvent) and isinstance(note.event, Progress):
        return ProgressNotice(note)
    return RunnerNotice(note)
