"""Pictures of a segmentation: an image for people to look at, with its mask's contour drawn.

predict's <name>_overlay.png (flmiseg/cli/render.py) and the cover of an exported package
(flmiseg/export/bioimage.py) are drawn here, so both show a mask the same way.
"""

import cv2
import numpy as np

from flmiseg.data import preprocess

CONTOUR_BGR = (0, 255, 255)  # yellow


def display_image(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W) of an image, mapping its 1-99.8 percentiles to 0-255."""
  return preprocess.stretch_to_uint8(image)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """BGR uint8 (H, W, 3): `display_image` of a raw (H, W) image with the contours of the
  (H, W) mask drawn in yellow."""
  bgr = cv2.cvtColor(display_image(image), cv2.COLOR_GRAY2BGR)
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST,
                                 cv2.CHAIN_APPROX_NONE)
  cv2.drawContours(bgr, contours, -1, CONTOUR_BGR, 1)
  return bgr
