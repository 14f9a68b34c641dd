"""The MedSAM dock widget: controls only; the work is done by :class:`~._annotator.annotator.BoxAnnotator`."""

from __future__ import annotations

import logging
import threading

from napari.layers import Image
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._annotator.annotator import BoxAnnotator
from ._annotator.options import guard_triton
from ._annotator.steering import HELP, Steering
from .engine.intensity import CT_PRESETS, parse_channels, window_from_limits
from .engine.models.registry import REGISTRY
from .engine.predictor import MedSAM

log = logging.getLogger(__name__)

INTENSITY_CHOICES = (
    ["auto", "layer contrast limits", "CT level/width"]
    + [f"CT {name}" for name in CT_PRESETS if name != "soft_tissue"]
    + ["MR / ultrasound / X-ray (percentiles)", "RGB"]
)


def widget_deleted(widget) -> bool:
    """True once Qt has deleted ``widget``'s C++ object (a worker may still report to it)."""
    try:
        from qtpy import sip

        return bool(sip.isdeleted(widget))
    except ImportError:  # PySide
        import shiboken6

        return not shiboken6.isValid(widget)


class _Loader(QObject):
    loaded = Signal(object, object)  # (model or None, error or None)


class MedSAMWidget(QWidget):
    """Dock widget: image, model, device, intensity, label id, actions, status."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.controller: BoxAnnotator | None = None
        self.last_error: str | None = None
        self._model_key = None
        self._applied_channels = ""
        self._loader = _Loader()
        self._loader.loaded.connect(self._on_loaded)

        self.image_combo = QComboBox(toolTip="Image layer to annotate; encoding starts when you pick it")
        self.model_combo = QComboBox(toolTip="litemedsam: fast on CPU (default). medsam: ViT-B, needs its checkpoint")
        self.model_combo.addItems(list(REGISTRY))
        self.checkpoint = QLineEdit(placeholderText="checkpoint (optional for litemedsam)")
        browse = QPushButton("...", toolTip="Choose a checkpoint file")
        browse.clicked.connect(self._browse)
        self.device_combo = QComboBox(toolTip="auto picks cuda, then mps, then cpu")
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.exact = QCheckBox(
            "authors' exact numerics",
            toolTip="Off (default): the fastest path that keeps the masks (LiteMedSAM on the CPU: ONNX Runtime or "
            "fused TinyViT encoder, fused decoder, fp16 embeddings; MedSAM/SAM: fused attention), agreeing with "
            "the authors' pipeline at mean Dice >= 0.999. On: reload the model with the authors' encoder and "
            "decoder numerics end to end (slower)",
        )
        self.intensity_combo = QComboBox(toolTip="How pixel values become the model's 8-bit input")
        self.intensity_combo.addItems(INTENSITY_CHOICES)
        self.level = QDoubleSpinBox(minimum=-5000, maximum=5000, value=40, toolTip="CT window level (HU)")
        self.width = QDoubleSpinBox(minimum=1, maximum=10000, value=400, toolTip="CT window width (HU)")
        self.channels_edit = QLineEdit(
            placeholderText="as displayed",
            toolTip="Multichannel layer (channel axis first): channels to combine as red, green, blue, e.g. 0 or 1,0. "
            "Each is scaled on its own; labels drop the channel axis. Empty: segment the plane on screen",
        )
        self.label_spin = QSpinBox(minimum=1, maximum=2**31 - 1, value=1, toolTip="Label id of the next new object")

        self.start_btn = QPushButton("Start / apply settings", toolTip="Load the model and encode the image on screen")
        self.delete_btn = QPushButton("Delete selected", toolTip="Delete the selected boxes and their labels (Delete)")
        self.undo_btn = QPushButton(
            "Undo", toolTip="Undo accept / edit / delete / propagate (Ctrl+Z on the boxes layer)"
        )
        self.redo_btn = QPushButton("Redo", toolTip="Redo (Ctrl+Shift+Z on the boxes layer)")
        self.prop_btn = QPushButton(
            "Propagate 3D", toolTip="Propagate the selected box's object through the volume (Shift+P). " + HELP
        )
        self.zclear_btn = QPushButton("Clear z-range", toolTip="Forget the z-range set with [ and ] (\\)")
        self.cancel_btn = QPushButton("Cancel", toolTip="Stop a running propagation")
        self.progress = QProgressBar(maximum=1, value=1, textVisible=False)
        self.prefetch_bar = QProgressBar(
            format="encoded ahead: %v / %m",
            textVisible=True,
            visible=False,
            toolTip="Planes encoded in the background (next slices, next image of a session): no encode wait there",
        )
        self.status = QLabel("pick an image layer", wordWrap=True)

        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("model", self.model_combo)
        row = QHBoxLayout()
        row.addWidget(self.checkpoint)
        row.addWidget(browse)
        form.addRow("weights", row)
        form.addRow("device", self.device_combo)
        form.addRow("", self.exact)
        form.addRow("intensity", self.intensity_combo)
        lw = QHBoxLayout()
        lw.addWidget(self.level)
        lw.addWidget(self.width)
        form.addRow("level / width", lw)
        form.addRow("channels", self.channels_edit)
        form.addRow("next label", self.label_spin)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.start_btn)
        for pair in ((self.undo_btn, self.redo_btn), (self.delete_btn, self.prop_btn)):
            r = QHBoxLayout()
            for b in pair:
                r.addWidget(b)
            layout.addLayout(r)
        layout.addWidget(self.cancel_btn)
        layout.addWidget(self.zclear_btn)
        layout.addWidget(self.progress)
        layout.addWidget(self.prefetch_bar)
        layout.addWidget(self.status)
        layout.addStretch()

        self.start_btn.clicked.connect(self.start)
        self.undo_btn.clicked.connect(lambda: self.controller and self.controller.undo())
        self.redo_btn.clicked.connect(lambda: self.controller and self.controller.redo())
        self.delete_btn.clicked.connect(lambda: self.controller and self.controller.delete_selected())
        self.steering = Steering(self.viewer, report=self.set_status)
        self.prop_btn.clicked.connect(lambda: self.controller and self.steering.propagate())
        self.zclear_btn.clicked.connect(self.steering.clear)
        self.cancel_btn.clicked.connect(self._cancel)
        self.label_spin.valueChanged.connect(self._set_next_label)
        self.image_combo.activated.connect(lambda _: self.start())
        self.intensity_combo.activated.connect(lambda _: self.start())
        self.channels_edit.editingFinished.connect(self._channels_edited)
        self.viewer.layers.events.inserted.connect(self._refresh_images)
        self.viewer.layers.events.removed.connect(self._refresh_images)
        self._refresh_images()
        if self.image_combo.count():
            self.start()

    # -- helpers ----------------------------------------------------------------
    def _refresh_images(self, event=None) -> None:
        current = self.image_combo.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "MedSAM checkpoint", "", "PyTorch (*.pth *.pt)")
        if path:
            self.checkpoint.setText(path)

    def selected_image(self) -> Image | None:
        name = self.image_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401 (LayerList)

    def intensity(self, image: Image):
        """Widget choice -> (modality, window) for the engine."""
        choice = self.intensity_combo.currentText()
        if choice == "layer contrast limits":
            lo, hi = image.contrast_limits
            return "ct", window_from_limits(lo, hi)
        if choice == "CT level/width":
            return "ct", (self.level.value(), self.width.value())
        if choice.startswith("CT "):
            return "ct", CT_PRESETS[choice[3:]]
        if choice.startswith("MR"):
            return "mr", None
        if choice == "RGB":
            return "rgb", None
        return "auto", None

    def _channels_edited(self) -> None:
        """Qt also reports focus loss as an edit: apply only a changed text."""
        if self.channels_edit.text().strip() != self._applied_channels:
            self.start()

    def channels(self, image: Image):
        """The picked channel indices along ``image``'s first axis, or None (segment what is displayed)."""
        text = self.channels_edit.text().strip()
        if not text:
            return None
        if image.rgb or image.ndim < 3:
            raise ValueError(
                f"channels: {image.name!r} (shape {image.data.shape}) has no channel axis; clear the field"
            )
        return parse_channels(text, image.data.shape[0])

    def set_status(self, text: str) -> None:
        if widget_deleted(self) or widget_deleted(self.status):
            log.debug("status after the widget was closed: %s", text)
            return
        busy = text.startswith(("encoding", "loading", "waiting", "propagating"))
        self.status.setText(text)
        self.progress.setMaximum(0 if busy else 1)
        if self.controller is not None and self.label_spin.value() != self.controller.next_label:
            self.label_spin.blockSignals(True)
            self.label_spin.setValue(self.controller.next_label)
            self.label_spin.blockSignals(False)

    def _on_prefetch(self, done: int, total: int) -> None:
        if widget_deleted(self.prefetch_bar):
            return
        self.prefetch_bar.setMaximum(max(total, 1))
        self.prefetch_bar.setValue(min(done, total))
        self.prefetch_bar.setVisible(total > 0 and done < total)

    def _set_next_label(self, value: int) -> None:
        if self.controller is not None:
            self.controller.next_label = value

    def _cancel(self) -> None:
        if self.controller is not None and self.controller.propagation is not None:
            self.controller.propagation.cancel()

    # -- model and image --------------------------------------------------------
    def start(self) -> None:
        """Load the chosen model if needed (in a thread), then attach the chosen image."""
        image = self.selected_image()
        if image is None:
            self.set_status("pick an image layer")
            return
        key = (
            self.model_combo.currentText(),
            self.device_combo.currentText(),
            self.checkpoint.text().strip() or None,
            self.exact.isChecked(),
        )
        if self.controller is not None and key == self._model_key:
            self._attach(image)
            return
        self._model_key = key
        self.set_status(f"loading {key[0]}...")
        guard_triton()
        import segment_anything  # noqa: F401  (import torchvision in the GUI thread, not the loader's)

        def load():
            try:
                model = MedSAM.load(key[0], device=key[1], checkpoint=key[2], exact=key[3])
                self._loader.loaded.emit(model, None)
            except Exception as exc:  # shown as a notification in the GUI thread
                log.debug("loading %s failed", key[0], exc_info=True)
                self._loader.loaded.emit(None, exc)

        threading.Thread(target=load, name="medsam-load", daemon=True).start()

    def _on_loaded(self, model, error) -> None:
        if error is not None:
            self._model_key = None
            self.last_error = str(error)
            show_error(f"MedSAM: {error}")
            self.set_status(f"could not load the model: {error}")
            return
        if self.controller is not None:
            self.controller.close()
        self.controller = BoxAnnotator(self.viewer, model, report=self.set_status)
        self.destroyed.connect(self.controller.close)
        self.controller.signals.prefetch.connect(self._on_prefetch)
        self.controller.next_label = self.label_spin.value()
        image = self.selected_image()
        if image is not None:
            self._attach(image)

    def _attach(self, image: Image) -> None:
        try:
            modality, window = self.intensity(image)
            self.controller.attach(image, modality, window, self.channels(image))
            self.steering.attach(self.controller)
            self._applied_channels = self.channels_edit.text().strip()
            self.label_spin.blockSignals(True)
            self.label_spin.setValue(self.controller.next_label)
            self.label_spin.blockSignals(False)
            self.set_status(f"encoding {image.name}...")
        except Exception as exc:  # a bad image or setting is shown (and logged); the session goes on
            log.warning("MedSAM: cannot use %s", image.name, exc_info=True)
            self.last_error = str(exc)
            show_error(f"MedSAM: {exc}")
            self.set_status(f"error: {exc}")

    def closeEvent(self, event) -> None:
        if self.controller is not None:
            self.controller.close()
        super().closeEvent(event)
