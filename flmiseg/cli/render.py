"""What --mode=predict draws and tabulates for each image (flmiseg/cli/predict.py):

  <name>_overlay.png  the image (1-99.8 percentile display range) with its mask's contour in
                      yellow (flmiseg/inference/overlay.py);
  <name>_objects.csv  one row per object of each plane: plane, label, area, centroid and mean
                      intensity (instances.object_table).

Both are written whole or not at all (a temporary file renamed).
"""

import csv
import os
import pathlib

import cv2
import numpy as np

from flmiseg.core.errors import UserError
from flmiseg.inference import overlay
from flmiseg.objects import instances


def write_overlay(path: pathlib.Path, image: np.ndarray, mask: np.ndarray) -> None:
  """A PNG of the raw (H, W) `image` with the contour of the (H, W) `mask` drawn."""
  tmp = path.with_name(f'.{path.name}.tmp.png')
  if not cv2.imwrite(str(tmp), overlay.overlay(image, mask)):
    raise UserError(f'{path}: cannot write')
  os.replace(tmp, path)


def write_objects(path: pathlib.Path, labels: np.ndarray, planes: np.ndarray,
                  pixel_size: float | None) -> None:
  """The objects CSV of instance labels (N, H, W) of raw planes (N, H, W) (sizes in um when
  `pixel_size` is known, else pixels)."""
  rows, header = [], None
  for index, (plane_labels, plane) in enumerate(zip(labels, planes)):
    header, plane_rows = instances.object_table(plane_labels, plane, pixel_size)
    rows += [[index] + row for row in plane_rows]
  tmp = path.with_name(f'.{path.name}.tmp')
  with open(tmp, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['plane'] + header)
    writer.writerows(rows)
  os.replace(tmp, path)
