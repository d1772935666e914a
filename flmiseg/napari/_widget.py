"""The napari widget: segments an image layer with a shipped model or a trained run folder.

Plugins > flmiseg > Segment docks it. The segmentation is a loaded model's
(flmiseg/inference/model.py: the inference core of --mode=predict), run in a worker thread
(napari.qt.threading) so the viewer stays responsive; the progress bar follows the tiles. The
results become Labels layers named '<image> mask' (1 foreground) and, with 'instances',
'<image> instances', on the image's scale and translation; running again replaces them.
Loaded models are kept, so only the first run of a model (or of a TTA setting) waits for
loading and compilation.
"""

import functools
import time

from magicgui import widgets
import napari
from napari.qt.threading import thread_worker
from napari.utils import notifications
import numpy as np
import pint
from qtpy.QtCore import QObject
from qtpy.QtCore import Signal

from flmiseg.store import pretrained
from flmiseg.core.errors import UserError

FOLDER_CHOICE = 'run folder...'  # the model combo's entry for a run or packed folder
NO_CHANNEL = -1  # the channel combo's value for 'none'
# The longest last axis offered as channels (flmiseg.inference.model.MAX_LAST_CHANNELS, not
# imported here: that would import JAX when the widget opens).
MAX_LAST_CHANNELS = 8


class _Progress(QObject):
  """Carries the worker thread's progress (percent) to the progress bar in the GUI thread."""
  changed = Signal(int)


# ignore_errors: a bug's exception is not raised again in the GUI thread; napari's workers
# show it as an error notification with its traceback.
@thread_worker(ignore_errors=True)
def _segment(models: dict, spec: str, data, rgb: bool, axes: str, options: dict):
  """(axes used, Segmentation, None) of `data`, or (None, None, the message) when the user's
  input is wrong (a UserError: one line, no traceback). Loads the model `spec` (a shipped
  model's name or a folder) into `models` on first use. Runs in a worker thread:
  flmiseg.inference.model (JAX) is imported here, not when napari starts."""
  from flmiseg.inference import model as model_lib  # pylint: disable=g-import-not-at-top
  try:
    if spec not in models:
      models[spec] = model_lib.load(spec)
    data = np.asarray(data)  # a lazy (dask, zarr) layer is read here, off the GUI thread
    axes = axes or model_lib.default_axes(data.shape, options['channel'], rgb)
    return axes, models[spec].segment(data, axes=axes, **options), None
  except UserError as e:
    return None, None, str(e)


class SegmentWidget(widgets.Container):
  """The dock widget: image layer, model, threshold, TTA, channel, axes, pixel size,
  instances, Segment.

  `run()` starts a segmentation and returns its worker (tests wait on it); `busy` says
  whether one is running; `result` is the last Segmentation.
  """

  def __init__(self, napari_viewer: napari.Viewer):
    self._viewer = napari_viewer
    self._image = widgets.create_widget(annotation=napari.layers.Image, label='image')
    self._model = widgets.ComboBox(label='model', value='nucleus',
                                   choices=list(pretrained.SHIPPED) + [FOLDER_CHOICE])
    self._folder = widgets.FileEdit(label='run folder', mode='d', visible=False)
    self._calibrated = widgets.CheckBox(text='calibrated threshold', value=True)
    self._threshold = widgets.FloatSpinBox(label='threshold', min=0.0, max=1.0, step=0.01,
                                           value=0.5, enabled=False)
    self._tta = widgets.CheckBox(text='TTA (8 flips/rotations, 8x slower)')
    self._channel = widgets.ComboBox(label='channel', choices=self._channel_choices)
    self._axes = widgets.LineEdit(label='axes', value='')
    self._instances = widgets.CheckBox(text='instances')
    self._pixel_size = widgets.FloatSpinBox(label='pixel size (µm)', min=0.0, max=1000.0,
                                            step=0.001, value=0.0)
    self._diameter = widgets.FloatSpinBox(label='object diameter (px)', min=0.0, max=10000.0,
                                          step=1.0, value=0.0)
    self._button = widgets.PushButton(text='Segment')
    self._progress = widgets.ProgressBar(label='progress', min=0, max=100, value=0)
    self._status = widgets.Label(value='')
    super().__init__(widgets=[
        self._image, self._model, self._folder, self._calibrated, self._threshold,
        self._tta, self._channel, self._axes, self._pixel_size, self._diameter,
        self._instances, self._button,
        self._progress, self._status])
    self._channel.tooltip = 'the channel to segment in a multi-channel image (0-based)'
    self._image.changed.connect(lambda _: self._channel.reset_choices())
    self._image.changed.connect(self._on_image)
    self._on_image(self._image.value)
    self._pixel_size.tooltip = (
        "micrometres per pixel of the image (0: unknown); taken from the layer's scale when "
        'its units are a length. A model that records its training pixel size resizes an '
        'image of another pixel size to it')
    self._diameter.tooltip = (
        'typical diameter of the objects in the image, pixels (0: not given); the image is '
        "resized so they match the model's (the nucleus model: 31 px), in place of the "
        'pixel size')
    self._axes.native.setPlaceholderText('auto')
    self._status.native.setWordWrap(True)
    self._axes.tooltip = ("the layer's axes, one letter per dimension from T, Z, C, Y, X "
                          "(S: RGB); empty: guessed (planes first, channels first or last)")
    self._threshold.tooltip = 'foreground probability threshold of the mask'
    self._model.changed.connect(self._on_model)
    self._calibrated.changed.connect(
        lambda value: setattr(self._threshold, 'enabled', not value))
    self._button.changed.connect(self.run)
    self._signals = _Progress()
    self._signals.changed.connect(self._progress.native.setValue)
    self._models = {}
    self.worker = None
    self.result = None

  @property
  def busy(self) -> bool:
    return self.worker is not None

  def _channel_choices(self, _=None) -> list[tuple[str, int]]:
    """'none', and the channel numbers of the longest axis that may hold channels (any but
    the last two, or the last when short: RGB, YXC)."""
    layer = self._image.value
    shape = () if layer is None else (layer.data[0] if layer.multiscale else layer.data).shape
    short_last = len(shape) > 2 and shape[-1] <= MAX_LAST_CHANNELS
    lengths = list(shape[:-2]) + ([shape[-1]] if short_last else [])
    return [('none', NO_CHANNEL)] + [(str(c), c) for c in range(max(lengths, default=0))]

  def _on_image(self, layer) -> None:
    """Fills the pixel size from the layer's scale when its units are a length (napari's
    default units, pixels, say nothing: 0, unknown)."""
    self._pixel_size.value = 0.0 if layer is None else layer_pixel_size(layer)

  def _on_model(self, value: str) -> None:
    self._folder.visible = value == FOLDER_CHOICE

  def _model_spec(self) -> str:
    if self._model.value != FOLDER_CHOICE:
      return self._model.value
    folder = str(self._folder.value or '').strip()
    if folder in ('', '.'):
      raise UserError('choose the run folder (a trained run or packed model) first')
    return folder

  def run(self):
    """Segments the chosen image layer in a worker thread; returns the worker (None when
    there is nothing to do, with a notification saying why)."""
    layer = self._image.value
    if self.busy:
      return None
    try:
      if layer is None:
        raise UserError('add an image layer first')
      model = self._model_spec()
    except UserError as e:
      notifications.show_warning(str(e))
      return None
    channel = None if self._channel.value == NO_CHANNEL else int(self._channel.value)
    options = {'channel': channel, 'tta': bool(self._tta.value),
               'threshold': None if self._calibrated.value else float(self._threshold.value),
               'instances': bool(self._instances.value), 'name': layer.name,
               # The diameter, when given, decides the resizing in place of the pixel size.
               'diameter': float(self._diameter.value) or None,
               'pixel_size': None if self._diameter.value else (
                   float(self._pixel_size.value) or None),
               'progress': lambda fraction: self._signals.changed.emit(round(100 * fraction))}
    data = layer.data[0] if layer.multiscale else layer.data
    self.worker = _segment(self._models, model, data, layer.rgb,
                           self._axes.value.strip().upper(), options)
    self.worker.returned.connect(functools.partial(self._show, layer, time.perf_counter()))
    self.worker.errored.connect(self._failed)
    self.worker.finished.connect(self._finished)
    self._button.enabled = False
    self._progress.value = 0
    self._status.value = f'segmenting {layer.name} with {model}...'
    worker = self.worker
    worker.start()
    return worker

  def _show(self, layer, started: float, result) -> None:
    axes, segmentation, error = result
    if error is not None:
      self._status.value = f'failed: {error}'
      notifications.show_error(error)
      return
    self.result = segmentation
    # The Labels layers sit where the image does: its scale and translation without the
    # channel axis (napari's RGB axis is last and is no layer dimension).
    letters = axes[:-1] if layer.rgb else axes
    keep = [i for i, a in enumerate(letters) if a != 'C']
    place = {}
    if len(letters) == layer.ndim:
      place = {'scale': np.asarray(layer.scale)[keep],
               'translate': np.asarray(layer.translate)[keep]}
    self._set_labels(f'{layer.name} mask', segmentation.mask, place)
    if segmentation.labels is not None:
      self._set_labels(f'{layer.name} instances', segmentation.labels, place)
    if self._calibrated.value:
      self._threshold.value = segmentation.threshold
    for warning in segmentation.warnings:
      notifications.show_warning(warning)
    self._progress.value = 100
    objects = '' if segmentation.labels is None else (
        f', {_count_objects(segmentation.labels)} objects')
    self._status.value = (
        f'{layer.name} ({axes}): {segmentation.mask.mean():.1%} foreground at threshold '
        f'{segmentation.threshold:.3f} ({segmentation.threshold_source}){objects}; '
        f'{time.perf_counter() - started:.1f} s')

  def _set_labels(self, name: str, data: np.ndarray, place: dict) -> None:
    """Replaces the data of the Labels layer `name`, or adds it."""
    if name in self._viewer.layers and isinstance(self._viewer.layers[name],
                                                  napari.layers.Labels):
      layer = self._viewer.layers[name]
      layer.data = data
      for key, value in place.items():
        setattr(layer, key, value)
    else:
      self._viewer.add_labels(data, name=name, **place)

  def _failed(self, error: Exception) -> None:
    self._status.value = f'failed: {type(error).__name__}: {error}'

  def _finished(self) -> None:
    self.worker = None
    self._button.enabled = True


def layer_pixel_size(layer) -> float:
  """Micrometres per pixel of an image layer's last (x) axis, from its scale and units; 0
  when the units are not a length (napari's default, pixels)."""
  unit = layer.units[-1]
  try:
    return float((layer.scale[-1] * unit).to('micrometer').magnitude)
  except pint.DimensionalityError:  # not a length: pixel, second, ...
    return 0.0


def _count_objects(labels: np.ndarray) -> int:
  """Objects in instance labels numbered 1..n per plane (Y, X the last two axes)."""
  planes = labels.reshape(-1, *labels.shape[-2:])
  return int(sum(int(plane.max()) for plane in planes))
