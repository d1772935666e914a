"""Datasets on disk: list files in the reference format, or images/ + masks/ folders.

List format: one `image_path mask_path` pair per line. Paths are absolute or relative to the
list file's folder. Blank lines and lines starting with `#` are ignored. Paths with spaces:
separate the two paths with a TAB, or quote them ("my image.tif" "my mask.tif"), or both.
Folder format: DIR/images/NAME.ext and DIR/masks/NAME.ext, matched by file stem.
"""

import dataclasses
import pathlib
import shlex

from flmiseg.data import io
from flmiseg.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Pair:
  """An image and its mask, with where they were listed (for error messages)."""
  image: pathlib.Path
  mask: pathlib.Path
  origin: str  # 'list.txt line 12' or the folder.


def _unquote(field: str) -> str:
  if len(field) >= 2 and field[0] == field[-1] and field[0] in '"\'':
    return field[1:-1]
  return field


def _split_line(line: str, where: str) -> list[str]:
  if '\t' in line:
    fields = [_unquote(f.strip()) for f in line.split('\t') if f.strip()]
  else:
    try:
      fields = shlex.split(line)
    except ValueError as e:
      raise UserError(f'{where}: cannot parse line ({e})') from e
  if len(fields) != 2:
    raise UserError(f'{where}: expected two paths (image and mask), found {len(fields)}; '
                    'paths with spaces need quotes or a TAB between them')
  return fields


def read_list(path) -> list[Pair]:
  """Parses a list file into Pairs; checks that every file exists and nothing repeats."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f'{path}: list file not found')
  base = path.resolve().parent
  pairs, seen = [], {}
  try:
    text = path.read_text()
  except UnicodeDecodeError as e:
    raise UserError(f'{path}: not a text list file (byte {e.start} is not UTF-8); expected '
                    '`image_path mask_path` lines') from e
  except OSError as e:
    raise UserError(f'{path}: cannot read the list file ({e.strerror})') from e
  for number, line in enumerate(text.splitlines(), start=1):
    stripped = line.strip()
    if not stripped or stripped.startswith('#'):
      continue
    where = f'{path} line {number}'
    image, mask = (base / p for p in _split_line(stripped, where))
    for kind, file in (('image', image), ('mask', mask)):
      if not file.is_file():
        raise UserError(f'{where}: {kind} file not found: {file}')
    if image in seen:
      raise UserError(f'{where}: duplicate entry {image} (first at line {seen[image]})')
    seen[image] = number
    pairs.append(Pair(image, mask, where))
  if not pairs:
    raise UserError(f'{path}: list is empty (no image/mask lines)')
  return pairs


def read_folder(path) -> list[Pair]:
  """Pairs DIR/images/* with DIR/masks/* by file stem."""
  path = pathlib.Path(path)
  image_dir, mask_dir = path / 'images', path / 'masks'
  if not image_dir.is_dir() or not mask_dir.is_dir():
    raise UserError(f'{path}: a dataset folder needs images/ and masks/ subfolders')
  masks = {f.stem: f for f in sorted(mask_dir.iterdir())
           if f.suffix.lower() in io.IMAGE_SUFFIXES}
  pairs = []
  for image in sorted(image_dir.iterdir()):
    if image.suffix.lower() not in io.IMAGE_SUFFIXES:
      continue
    if image.stem not in masks:
      raise UserError(f'{image}: no mask named {image.stem}.* in {mask_dir}')
    pairs.append(Pair(image.resolve(), masks[image.stem].resolve(), str(path)))
  if not pairs:
    raise UserError(f'{image_dir}: no images found')
  return pairs


def load_pairs(spec) -> list[Pair]:
  """Pairs from a list file or a dataset folder."""
  spec = pathlib.Path(spec)
  if spec.is_dir():
    return read_folder(spec)
  return read_list(spec)
