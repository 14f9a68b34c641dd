"""The "MedSAM session" dock's controls (layout, image list), its main-widget lookup, a wait that holds input."""

from __future__ import annotations

import logging
from concurrent.futures import Future

from qtpy.QtCore import QEvent, QEventLoop, QObject, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QApplication,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._widget import MedSAMWidget
from .engine.session import DONE, IN_PROGRESS, NOT_STARTED, SKIPPED

log = logging.getLogger(__name__)

STATUS_COLORS = {NOT_STARTED: "#a0a0a0", IN_PROGRESS: "#e0b040", DONE: "#50c050", SKIPPED: "#c06060"}
STATUS_MARKS = {NOT_STARTED: "\u2022", IN_PROGRESS: "\u270e", DONE: "\u2713", SKIPPED: "\u2013"}


_INPUT = {
    QEvent.Type.MouseButtonPress,
    QEvent.Type.MouseButtonRelease,
    QEvent.Type.MouseButtonDblClick,
    QEvent.Type.KeyPress,
    QEvent.Type.KeyRelease,
    QEvent.Type.Wheel,
    QEvent.Type.ShortcutOverride,
}


class _HoldInput(QObject):
    """While installed on the application: user input is held back, then posted again on :meth:`release`.

    Qt's ``ExcludeUserInputEvents`` defers only the window system's events; this also
    holds input posted by other code, so no click runs in the middle of an image switch.
    """

    def __init__(self):
        super().__init__()
        self.held = []

    def eventFilter(self, obj, event) -> bool:
        if event.type() not in _INPUT:
            return False
        self.held.append((obj, event.clone()))
        return True

    def release(self) -> None:
        held, self.held = self.held, []
        for obj, event in held:
            QApplication.postEvent(obj, event)


def find_main_widget(viewer):
    """The MedSAM dock widget of ``viewer``'s window; opened there if missing."""
    for w in viewer.window.dock_widgets.values():
        w = getattr(w, "native", w)
        if isinstance(w, MedSAMWidget):
            return w
    try:
        _, w = viewer.window.add_plugin_dock_widget("napari-medsam", "MedSAM")
        return w
    except Exception:  # plugin not registered (source tree): dock one directly, and say why
        log.warning("the MedSAM dock widget is not registered with napari; docking it directly", exc_info=True)
        w = MedSAMWidget(viewer)
        viewer.window.add_dock_widget(w, name="MedSAM")
        return w


def wait_without_input(fut: Future, timeout: float) -> bool:
    """Run a local event loop until ``fut`` (resolved in this GUI thread) is done or ``timeout`` s pass.

    The workers' results are delivered meanwhile; user input is held and handled after
    the wait (no click runs in the middle of what the caller is doing). True if done.
    """
    if fut.done():
        return True
    loop, hold, app = QEventLoop(), _HoldInput(), QApplication.instance()
    fut.add_done_callback(lambda _: loop.quit())
    QTimer.singleShot(int(timeout * 1000), loop.quit)
    app.installEventFilter(hold)
    try:
        loop.exec(QEventLoop.ProcessEventsFlag.ExcludeUserInputEvents)
    finally:
        app.removeEventFilter(hold)
        hold.release()  # handled after the wait, in the order given
    return fut.done()


class SessionControls(QWidget):
    """The session dock's widgets; :class:`~._session_widget.SessionWidget` adds the behaviour."""

    session = None
    index = None

    def build_controls(self) -> None:
        self.input_edit = QLineEdit(
            placeholderText="image folder or list file",
            toolTip="Folder of images (PNG/JPG/TIFF/NIfTI/DICOM folders) or a text file listing them",
        )
        in_btn = QPushButton("...", toolTip="Choose the image folder")
        in_btn.clicked.connect(self._browse_input)
        self.output_edit = QLineEdit(
            placeholderText="output folder (default: <input>-medsam)",
            toolTip="Labels, records and session.json go here; an existing session is resumed",
        )
        out_btn = QPushButton("...", toolTip="Choose the output folder")
        out_btn.clicked.connect(self._browse_output)
        self.open_btn = QPushButton(
            "Open session", toolTip="List the images and resume where the output folder left off"
        )
        self.prev_btn = QPushButton("\u25c0 Previous", toolTip="Save and go to the previous image")
        self.next_btn = QPushButton("Next \u25b6", toolTip="Save and go to the next image")
        self.jump_spin = QSpinBox(minimum=1, maximum=1, toolTip="Image number")
        self.jump_btn = QPushButton("Go", toolTip="Save and go to the image number on the left")
        self.done_btn = QPushButton("Mark done", toolTip="Save, mark this image done and go to the next one")
        self.skip_btn = QPushButton(
            "Skip", toolTip="Mark this image skipped (left out of the export) and go to the next one"
        )
        self.progress = QLabel("no session")
        self.list = QListWidget(toolTip="Images and their status; click one to go there")
        self.status = QLabel("", wordWrap=True)

        form = QFormLayout()
        for label, edit, btn in (("images", self.input_edit, in_btn), ("output", self.output_edit, out_btn)):
            row = QHBoxLayout()
            row.addWidget(edit)
            row.addWidget(btn)
            form.addRow(label, row)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.open_btn)
        nav = QHBoxLayout()
        for w in (self.prev_btn, self.next_btn, self.jump_spin, self.jump_btn):
            nav.addWidget(w)
        layout.addLayout(nav)
        mark = QHBoxLayout()
        mark.addWidget(self.done_btn)
        mark.addWidget(self.skip_btn)
        layout.addLayout(mark)
        layout.addWidget(self.progress)
        layout.addWidget(self.list)
        layout.addWidget(self.status)

    def _browse_input(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Image folder", self.input_edit.text())
        if path:
            self.input_edit.setText(path)

    def _browse_output(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Output folder", self.output_edit.text())
        if path:
            self.output_edit.setText(path)

    def _enable(self, on: bool) -> None:
        for w in (self.prev_btn, self.next_btn, self.jump_spin, self.jump_btn, self.done_btn, self.skip_btn):
            w.setEnabled(on)

    def _refresh(self) -> None:
        s = self.session
        if s is None:
            self.progress.setText("no session")
            self.list.clear()
            return
        self.progress.setText(s.progress_text())
        self.list.blockSignals(True)
        if self.list.count() != len(s):
            self.list.clear()
            for _ in s.items:
                self.list.addItem(QListWidgetItem())
        for i, it in enumerate(s.items):
            item = self.list.item(i)
            item.setText(f"{STATUS_MARKS[it.status]} {i + 1}. {it.name} \u2014 {it.status}")
            item.setForeground(QColor(STATUS_COLORS[it.status]))
            f = item.font()
            f.setBold(i == self.index)
            item.setFont(f)
        if self.index is not None:
            self.list.setCurrentRow(self.index)
            self.jump_spin.setValue(self.index + 1)
        self.list.blockSignals(False)
        if self.index is not None:
            self.prev_btn.setEnabled(self.index > 0)
            self.next_btn.setEnabled(self.index < len(s) - 1)
