"""Labelled video datasets for downstream evaluation: labels (:class:`LabelSet`, from CelebV-HQ
or a CSV / JSON label file), window features (:func:`load_features`) and clips (:class:`ClipDataset`).

A sample's key is its video path relative to the video root, without extension. Bad inputs raise
:class:`DatasetError` naming the file, or with ``on_error="skip"`` are dropped into ``skipped``.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Literal

import grain
import numpy as np

from marlin_jax.data.records import resize_frames, sample_frame_indices
from marlin_jax.data.videos import read_video_frames
from marlin_jax.evaluation.scores import LABEL_KINDS, LabelKind
from marlin_jax.video_io import VideoReadError, count_frames

CELEBVHQ_TASKS = {"appearance": 40, "action": 35}
SPLITS = ("train", "val", "test")
REDUCTIONS = ("mean", "max", "min")
OnError = Literal["error", "skip"]
log = logging.getLogger(__name__)
# scripts/extract_dataset.py leaves ``<key>.error.json`` beside a video whose extraction failed.
ERROR_MARKER_SUFFIX = ".error.json"


class DatasetError(ValueError):
    """A label, split, video or feature file is missing or malformed (the message names it)."""


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """Samples of one split: ``keys`` and absolute ``video_paths`` ``(N,)``, ``labels`` bool
    ``(N,)`` (binary), int64 ``(N,)`` (multiclass) or bool ``(N, L)`` (multilabel), the label or
    class names, and the ``source`` label file (for error messages)."""

    keys: tuple[str, ...]
    labels: np.ndarray
    task: LabelKind
    class_names: tuple[str, ...]
    video_paths: tuple[str, ...]
    source: str = ""

    def __post_init__(self):
        if self.task not in LABEL_KINDS:
            raise ValueError(f"task must be one of {LABEL_KINDS}, got {self.task!r}")
        n = len(self.keys)
        if len(self.video_paths) != n or self.labels.shape[:1] != (n,):
            raise ValueError("keys, labels and video_paths differ in length")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_outputs(self) -> int:
        """Width of the classifier head: 1 (binary), C (multiclass) or L (multilabel)."""
        return 1 if self.task == "binary" else len(self.class_names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelSet:
        """The samples at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(self, keys=tuple(self.keys[i] for i in idx), labels=self.labels[idx],
                                   video_paths=tuple(self.video_paths[i] for i in idx))

    def take_ratio(self, ratio: float) -> LabelSet:
        """The first ``int(N * ratio)`` samples (the original's few-shot ``data_ratio``)."""
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"data_ratio must be in (0, 1], got {ratio}")
        n = int(len(self) * ratio)
        if n == 0:
            raise DatasetError(f"{self.source}: data_ratio {ratio} of {len(self)} samples leaves none")
        return self.subset(np.arange(n))

    def check_videos(self, on_error: OnError = "error") -> tuple[LabelSet, dict[str, str]]:
        """Drops (``skip``) or raises on (``error``) missing video files; returns the kept
        samples and ``{key: reason}`` of those skipped."""
        missing = {k: f"{p}: no such video file"
                   for k, p in zip(self.keys, self.video_paths, strict=True) if not os.path.isfile(p)}
        if missing and on_error == "error":
            raise DatasetError(_listing(f"{self.source}: {len(missing)} listed video(s) missing",
                                        list(missing.values())))
        keep = [i for i, k in enumerate(self.keys) if k not in missing]
        return self.subset(keep), missing


def _listing(head: str, items: Sequence[str], limit: int = 5) -> str:
    return f"{head}: " + _joined(items, limit)


def _joined(items: Sequence[str], limit: int = 5) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _read_json(path: str) -> object:
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e


def read_split_file(path: str | os.PathLike) -> list[str]:
    """Names listed one per line (blank lines ignored), as the original's split files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: split file not found")
    with open(path, encoding="utf-8") as f:
        names = [n for n in (line.strip() for line in f) if n]
    if not names:
        raise DatasetError(f"{path}: split file lists no samples")
    dupes = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if dupes:
        raise DatasetError(_listing(f"{path}: duplicate names", dupes))
    return names


def load_celebvhq(
    root: str | os.PathLike, split: str, task: str, data_ratio: float = 1.0
) -> LabelSet:
    """CelebV-HQ ``split`` of ``task`` ("appearance": 40 labels, "action": 35) as a multilabel set.

    ``data_ratio`` keeps the first fraction of the list (the original: train and val only).
    Unknown names, vectors of the wrong length and values outside {0, 1} raise DatasetError.
    """
    root = os.fspath(root)
    if task not in CELEBVHQ_TASKS:
        raise ValueError(f"CelebV-HQ task must be one of {tuple(CELEBVHQ_TASKS)}, got {task!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    split_path = os.path.join(root, f"{split}.txt")
    names = read_split_file(split_path)
    info_path = os.path.join(root, "celebvhq_info.json")
    info = _read_json(info_path)
    if not isinstance(info, dict) or not isinstance(info.get("clips"), dict):
        raise DatasetError(f"{info_path}: expected an object with a 'clips' mapping")
    clips = info["clips"]
    unknown = [n for n in names if n not in clips]
    if unknown:
        raise DatasetError(_listing(f"{split_path}: {len(unknown)} name(s) not in {info_path}",
                                    unknown))
    width = CELEBVHQ_TASKS[task]
    labels = np.zeros((len(names), width), dtype=bool)
    outside: list[str] = []  # clips with values outside the known label set {0, 1}
    for i, name in enumerate(names):
        try:
            y = clips[name]["attributes"][task]
        except (KeyError, TypeError) as e:
            raise DatasetError(f"{info_path}: clip {name!r} has no attributes/{task}") from e
        if not isinstance(y, list) or len(y) != width:
            got = f"{len(y)} values" if isinstance(y, list) else f"a {type(y).__name__}"
            raise DatasetError(f"{info_path}: clip {name!r} attributes/{task} must be {width} "
                               f"values in {{0, 1}}, got {got}")
        odd = [f"[{j}]={v!r}" for j, v in enumerate(y)
               if not (isinstance(v, int | float) and v in (0, 1))]
        if odd:
            outside.append(f"clip {name!r}: {_joined(odd, 3)}")
            continue
        labels[i] = np.asarray(y, dtype=bool)
    if outside:
        raise DatasetError(_listing(f"{info_path}: attributes/{task} values outside {{0, 1}} "
                                    f"(the {width} CelebV-HQ {task} labels are binary) in "
                                    f"{len(outside)} clip(s)", outside))
    class_names = _celebvhq_label_names(info_path, info, task, width)
    video_root = os.path.join(os.path.abspath(root), "cropped")
    labelset = LabelSet(tuple(names), labels, "multilabel", class_names,
                        tuple(os.path.join(video_root, n + ".mp4") for n in names), source=split_path)
    return labelset.take_ratio(data_ratio) if data_ratio < 1.0 else labelset


def _celebvhq_label_names(info_path: str, info: dict, task: str, width: int) -> tuple[str, ...]:
    """``meta_info/<task>_mapping`` (``width`` names), or ``<task>_<j>`` when absent."""
    meta = info.get("meta_info")
    mapping = meta.get(f"{task}_mapping") if isinstance(meta, dict) else None
    if mapping is None:
        return tuple(f"{task}_{j}" for j in range(width))
    if not (isinstance(mapping, list) and len(mapping) == width
            and all(isinstance(m, str) for m in mapping)):
        got = f"{len(mapping)} entries" if isinstance(mapping, list) else f"a {type(mapping).__name__}"
        raise DatasetError(f"{info_path}: meta_info/{task}_mapping must list the {width} {task} "
                           f"label names, got {got}")
    return tuple(mapping)


PATH_COLUMNS = ("path", "video", "file", "name")


def load_label_file(path: str | os.PathLike, *, task: LabelKind | None = None, split: str | None = None,
                    class_names: Sequence[str] | None = None,
                    video_root: str | os.PathLike | None = None) -> LabelSet:
    """Labels of any task from a CSV or JSON file.

    CSV: a header with a path column (``path``/``video``/``file``/``name``), then one ``label``
    column (binary 0/1, or multiclass indices / names) or several 0/1 columns (multilabel), and
    an optional ``split`` column; every row has the header's cells, none of label / split empty.
    JSON: a list of ``{"path", "label", "split"}`` records (``label`` a scalar, a 0/1 list or a
    list of label names) or a ``{path: label}`` mapping.

    Args:
      path: the label file (.csv or .json).
      task: forces the task; else inferred (lists / columns -> multilabel; all 0/1 -> binary).
      split: keep only rows of this ``split`` (every row needs one; for train/val/test every
        value must be one of those). Task and classes come from all rows.
      class_names: the allowed classes / labels, in head order (others raise DatasetError).
        Omitted: inferred from the whole file (all indices ``0..max`` or all distinct names),
        see :func:`_infer_classes`, and logged.
      video_root: where relative video paths start; defaults to the label file's folder.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: label file not found")
    root = os.path.abspath(os.fspath(video_root) if video_root is not None
                           else os.path.dirname(path))
    readers = {".csv": _read_csv_records, ".json": _read_json_records}
    ext = os.path.splitext(path)[1].lower()
    if ext not in readers:
        raise DatasetError(f"{path}: label file must be .csv or .json")
    records, label_cols = readers[ext](path)
    if not records:
        raise DatasetError(f"{path}: no samples")
    file_records = records  # the task and the classes come from the whole file, every split
    if split is not None:
        records = _select_split(path, records, split)

    values = [r["label"] for r in records]
    wheres = [r["where"] for r in records]
    file_values = [r["label"] for r in file_records]
    multilabel_rows = label_cols is not None or any(isinstance(v, list) for v in file_values)
    if task is None:
        task = "multilabel" if multilabel_rows else (
            "binary" if all(_as_bit(v) is not None for v in file_values) else "multiclass")
    if task not in LABEL_KINDS:
        raise ValueError(f"task must be one of {LABEL_KINDS}, got {task!r}")

    if task == "multilabel":
        labels, names = _multilabel(path, values, label_cols, class_names, wheres)
    elif multilabel_rows:
        raise DatasetError(f"{path}: several label columns / lists given but task is {task!r}")
    elif task == "binary":
        bits = [_as_bit(v) for v in values]
        bad = [f"{wheres[i]}: {values[i]!r}" for i, b in enumerate(bits) if b is None]
        if bad:
            raise DatasetError(_listing(f"{path}: binary labels must be 0/1/true/false", bad))
        labels = np.asarray(bits, dtype=bool)
        names = tuple(class_names) if class_names else ("label",)
    elif class_names is None:
        inferred = _infer_classes(path, file_records)
        labels, names = _multiclass(path, [_label_text(v) for v in values], inferred, wheres)
    else:
        labels, names = _multiclass(path, values, class_names, wheres)

    keys, video_paths = [], []
    for r in records:
        p = str(r["path"]).strip()
        if not p:
            raise DatasetError(f"{path}: empty path in a row")
        full = os.path.join(root, p)  # p itself when absolute
        video_paths.append(os.path.normpath(full))
        keys.append(os.path.splitext(os.path.relpath(full, root))[0].replace(os.sep, "/"))
    dupes = sorted(k for k, count in collections.Counter(keys).items() if count > 1)
    if dupes:
        raise DatasetError(_listing(f"{path}: duplicate samples", dupes))
    return LabelSet(tuple(keys), labels, task, tuple(names), tuple(video_paths), source=path)


def _read_csv_records(path: str) -> tuple[list[dict], list[str] | None]:
    """CSV rows as records ``{"path", "label", ["split"], "where": "line N"}`` (checked)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DatasetError(f"{path}: empty CSV file (no header)") from None
        header_line = reader.line_num
        rows: list[tuple[int, list[str]]] = [(reader.line_num, cells) for cells in reader if cells]
    empty = [i + 1 for i, h in enumerate(header) if not h]
    if empty:
        raise DatasetError(f"{path}: line {header_line}: empty column name in the header "
                           f"(column {empty[0]} of {len(header)}; a trailing comma?)")
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise DatasetError(f"{path}: line {header_line}: repeated header column(s) {repeated}")
    path_col = next((c for c in PATH_COLUMNS if c in header), None)
    if path_col is None:
        raise DatasetError(f"{path}: CSV header needs a path column (one of {PATH_COLUMNS}), "
                           f"got {header}")
    rest = [c for c in header if c not in (path_col, "split")]
    if not rest:
        raise DatasetError(f"{path}: CSV has no label column")
    label_cols = None if rest == ["label"] else rest
    bad = [f"line {line}: {len(cells)} cells" for line, cells in rows if len(cells) != len(header)]
    if bad:
        raise DatasetError(_listing(
            f"{path}: rows must have the header's {len(header)} cells ({','.join(header)}); a "
            "trailing comma or a missing cell", bad))
    records = []
    empty_cells = []
    for line, cells in rows:
        row = dict(zip(header, (c.strip() for c in cells), strict=True))
        rec = {"path": row[path_col], "where": f"line {line}",
               "label": row["label"] if label_cols is None else [row[c] for c in label_cols]}
        if "split" in row:
            rec["split"] = row["split"]
        empty_cells += [f"line {line}: {k}" for k, v in rec.items() if v == ""]
        records.append(rec)
    if empty_cells:
        raise DatasetError(_listing(f"{path}: empty cell(s)", empty_cells))
    return records, label_cols


def _read_json_records(path: str) -> tuple[list[dict], None]:
    data = _read_json(path)
    if isinstance(data, dict):
        return [{"path": k, "label": v, "where": f"entry {k!r}"} for k, v in data.items()], None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DatasetError(f"{path}: expected a list of records or a {{path: label}} mapping")
    records = []
    for i, r in enumerate(data):
        p = next((r[c] for c in PATH_COLUMNS if c in r), None)
        if p is None or "label" not in r and "labels" not in r:
            raise DatasetError(f"{path}: record {i} needs a path and a 'label' / 'labels' field")
        rec = {"path": p, "label": r.get("label", r.get("labels")), "where": f"record {i}"}
        if "split" in r:
            rec["split"] = r["split"]
        records.append(rec)
    return records, None


def _select_split(path: str, records: list[dict], split: str) -> list[dict]:
    """The records of ``split`` (a mistyped split value is an error, not a row dropped)."""
    missing = [r["where"] for r in records if r.get("split") in (None, "")]
    if missing:
        raise DatasetError(_listing(f"{path}: split {split!r} requested but rows have no "
                                    "'split' value", missing))
    if split in SPLITS:
        odd = [f"{r['where']}: {r['split']!r}" for r in records if r["split"] not in SPLITS]
        if odd:
            raise DatasetError(_listing(f"{path}: split values must be one of {SPLITS}", odd))
    selected = [r for r in records if r["split"] == split]
    if not selected:
        raise DatasetError(f"{path}: no rows with split {split!r}")
    return selected


def _label_text(v: object) -> str:
    """A single label as text; integer class indices in canonical form ("01" -> "1")."""
    text = str(v).strip()
    return str(int(text)) if _is_index(text) else text


def _is_index(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _infer_classes(path: str, records: list[dict]) -> tuple[str, ...]:
    """The classes of a multiclass file without ``class_names``: all indices (``0..max``, each
    with rows) or all names (sorted, none equal up to case and punctuation). A mix, an index
    without rows or near-duplicate names raise DatasetError listing the values and rows."""
    rows: dict[str, list[str]] = collections.defaultdict(list)
    for r in records:
        rows[_label_text(r["label"])].append(r["where"])

    def show(values: Sequence[str]) -> str:
        return "; ".join(f"{v!r}: {len(rows[v])} row(s) ({_joined(rows[v], 3)})"
                         for v in values)

    indices = sorted((v for v in rows if _is_index(v)), key=int)
    names = sorted(v for v in rows if not _is_index(v))
    if indices and names:
        fewer = names if sum(len(rows[v]) for v in names) <= sum(len(rows[v]) for v in indices) \
            else indices
        raise DatasetError(
            f"{path}: labels mix class indices {indices} and class names {names} (a typo?); "
            f"the rarer kind: {show(fewer)}; pass class_names to fix the classes")
    if indices:
        if int(indices[0]) < 0:
            raise DatasetError(f"{path}: negative class index: {show(indices[:1])}")
        classes = tuple(str(c) for c in range(int(indices[-1]) + 1))
        empty = [c for c in classes if c not in rows]
        if empty:
            raise DatasetError(
                f"{path}: class indices {', '.join(empty[:10])} have no rows, so the "
                f"{len(classes)} classes 0..{indices[-1]} come from: {show(indices)} (a typo?); "
                "pass class_names to fix the classes")
    else:
        groups: dict[str, list[str]] = collections.defaultdict(list)
        for v in names:
            groups["".join(ch for ch in v.casefold() if ch.isalnum())].append(v)
        clashes = [v for group in groups.values() if len(group) > 1 for v in group]
        if clashes:
            raise DatasetError(f"{path}: class names differ only in case, spaces or punctuation: "
                               f"{show(clashes)}; pass class_names to fix the classes")
        classes = tuple(names)
    # a warning, not info: the evaluate CLI shows warnings only, and an inferred class set is
    # exactly where a mistyped value would hide
    log.warning("%s: %d classes inferred from the labels: %s (set class_names, "
                "labels.class_names in a config, to fix the set)", path, len(classes),
                ", ".join(f"{c!r} ({len(rows[c])} rows)" for c in classes))
    return classes


_BITS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


def _as_bit(v: object) -> int | None:
    """A binary label (bool, 0 / 1 number or text) as 0 / 1; None when it is not one."""
    if isinstance(v, str):
        return _BITS.get(v.strip().lower())
    return int(v) if isinstance(v, int | float) and v in (0, 1) else None


def _multiclass(path: str, values: list, class_names: Sequence[str], wheres: Sequence[str]):
    """Class indices of ``values`` in ``class_names``; a value outside them is an error naming
    the value and its rows."""
    as_str = [str(v).strip() for v in values]
    index = {str(c): i for i, c in enumerate(class_names)}
    unknown: dict[str, list[str]] = {}
    for s, where in zip(as_str, wheres, strict=True):
        if s not in index:
            unknown.setdefault(s, []).append(where)
    if unknown:
        raise DatasetError(_listing(
            f"{path}: unknown class name(s) (known: {list(index)})",
            [f"{v!r} ({len(w)} row(s): {_joined(w, 3)})" for v, w in sorted(unknown.items())]))
    return np.asarray([index[s] for s in as_str], dtype=np.int64), tuple(map(str, class_names))


def _multilabel(path: str, values: list, label_cols: list[str] | None,
                class_names: Sequence[str] | None, wheres: Sequence[str]):
    if label_cols is not None:  # CSV: one 0/1 column per label
        names = tuple(label_cols)
        if class_names is not None:
            unknown = [c for c in label_cols if c not in class_names]
            if unknown:
                raise DatasetError(_listing(f"{path}: unknown label column(s)", unknown))
            absent = [c for c in class_names if c not in label_cols]
            if absent:
                raise DatasetError(_listing(f"{path}: label column(s) missing", absent))
            names = tuple(class_names)  # columns in the given order, whatever the file's
        bits = [[_as_bit(x) for x in v] for v in values]
        bad = [wheres[i] for i, b in enumerate(bits) if any(x is None for x in b)]
        if bad:
            raise DatasetError(_listing(f"{path}: label columns must hold 0/1/true/false", bad))
        order = [label_cols.index(c) for c in names]
        return np.asarray(bits, dtype=bool)[:, order], names
    if not all(isinstance(v, list) for v in values):
        raise DatasetError(f"{path}: multilabel JSON labels must all be lists")
    if all(all(_as_bit(x) is not None and not isinstance(x, str) for x in v) for v in values):
        widths = {len(v) for v in values}  # 0/1 vectors
        if len(widths) != 1:
            raise DatasetError(f"{path}: multilabel vectors differ in length: {sorted(widths)}")
        width = widths.pop()
        names = tuple(class_names) if class_names else tuple(f"label_{j}" for j in range(width))
        if len(names) != width:
            raise DatasetError(f"{path}: {width} labels per row but {len(names)} class names")
        return np.asarray(values, dtype=bool), names
    # lists of label names that are on
    names = tuple(class_names) if class_names else tuple(sorted({str(x) for v in values for x in v}))
    index = {n: j for j, n in enumerate(names)}
    unknown = sorted({str(x) for v in values for x in v if str(x) not in index})
    if unknown:
        raise DatasetError(_listing(f"{path}: unknown label name(s) (known: {list(names)})",
                                    unknown))
    labels = np.zeros((len(values), len(names)), dtype=bool)
    for i, v in enumerate(values):
        labels[i, [index[str(x)] for x in v]] = True
    return labels, names


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """Window-reduced features ``x`` float32 ``(N, D)`` with ``labels`` and ``keys``;
    ``skipped``: ``{key: reason}`` of samples left out (``on_error="skip"``)."""

    x: np.ndarray
    labels: np.ndarray
    keys: tuple[str, ...]
    skipped: dict[str, str]


def reduce_windows(features: np.ndarray, reduction: str) -> np.ndarray:
    """Temporal reduction of window features ``(T, D) -> (D,)``: mean, max or min."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"temporal reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return getattr(features, reduction)(axis=0)


def read_feature_file(path: str | os.PathLike, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One feature file, ``(T, D)`` or ``(T, N, D)`` (``--keep_seq``); DatasetError if missing,
    marked failed, empty, of another shape, or not finite."""
    path = os.fspath(path)
    marker = os.path.splitext(path)[0] + ERROR_MARKER_SUFFIX
    if not os.path.isfile(path):
        if os.path.isfile(marker):
            raise DatasetError(f"{path}: extraction failed (see {marker})")
        raise DatasetError(f"{path}: feature file not found (run scripts/extract_dataset.py)")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{path}: not a readable .npy file ({e})") from e
    if x.ndim not in (2, 3):
        raise DatasetError(f"{path}: expected (T, D) window or (T, N, D) token features, got shape {x.shape}")
    if x.shape[0] == 0:
        raise DatasetError(f"{path}: empty feature file (0 windows; the video was too short or "
                           "failed to extract)")
    if shape is not None and x.shape[1:] != tuple(shape):
        raise DatasetError(f"{path}: features of shape {x.shape[1:]} per window, expected {tuple(shape)}")
    if not np.issubdtype(x.dtype, np.floating) or not np.all(np.isfinite(x)):
        raise DatasetError(f"{path}: features must be finite floats, got {x.dtype}")
    return x


def load_features(feature_dir: str | os.PathLike, labelset: LabelSet, reduction: str = "mean",
                  on_error: OnError = "error") -> FeatureSet:
    """Reads ``<feature_dir>/<key>.npy`` of every sample, reduced over windows (token features
    flattened to ``N * D``). Bad files raise (``error``) or go to ``skipped`` (``skip``)."""
    feature_dir = os.fspath(feature_dir)
    if not os.path.isdir(feature_dir):
        raise DatasetError(f"{feature_dir}: feature folder not found "
                           "(run scripts/extract_dataset.py first)")
    rows, keep, skipped = [], [], {}
    shape = None
    for i, key in enumerate(labelset.keys):
        try:
            x = read_feature_file(os.path.join(feature_dir, key + ".npy"), shape)
        except DatasetError as e:
            if on_error == "error":
                raise
            skipped[key] = str(e)
            continue
        shape = x.shape[1:]
        rows.append(reduce_windows(x.astype(np.float32), reduction).reshape(-1))
        keep.append(i)
    if not rows:
        raise DatasetError(_listing(f"{feature_dir}: no usable feature file for "
                                    f"{labelset.source}", list(skipped.values())))
    return FeatureSet(np.stack(rows).astype(np.float32), labelset.labels[np.asarray(keep)],
                      tuple(labelset.keys[i] for i in keep), skipped)


class ClipDataset:
    """Raw clips of a LabelSet for fine-tuning: ``clip(i, rng)`` is exactly pretraining's clip
    of the same video and RNG. Frame counts are cached; only sampled frames decode."""

    def __init__(self, labelset: LabelSet, clip_frames: int = 16, sample_rate: int = 2,
                 size: int = 224):
        self.labelset = labelset
        self.clip_frames = clip_frames
        self.sample_rate = sample_rate
        self.size = size
        self._num_frames: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.labelset)

    def validate(self, on_error: OnError = "error") -> tuple[ClipDataset, dict[str, str]]:
        """Counts every video's frames (cached), so that a bad video fails here rather than
        mid-training; returns the dataset to use and ``{key: reason}`` of those dropped."""
        bad: dict[str, str] = {}
        for i, key in enumerate(self.labelset.keys):
            try:
                if self.num_frames(i) < 1:
                    raise VideoReadError(f"{self.labelset.video_paths[i]}: video has no frames")
            except VideoReadError as e:
                if on_error == "error":
                    raise DatasetError(f"{self.labelset.source}: {e}") from e
                bad[key] = str(e)
        if not bad:
            return self, bad
        keep = [i for i, k in enumerate(self.labelset.keys) if k not in bad]
        if not keep:
            raise DatasetError(f"{self.labelset.source}: no readable video")
        out = ClipDataset(self.labelset.subset(keep), self.clip_frames, self.sample_rate,
                          self.size)
        out._num_frames = {j: self._num_frames[i] for j, i in enumerate(keep)}
        return out, bad

    def num_frames(self, i: int) -> int:
        if i not in self._num_frames:
            self._num_frames[i] = count_frames(self.labelset.video_paths[i])
        return self._num_frames[i]

    def clip(self, i: int, rng: np.random.Generator) -> np.ndarray:
        """uint8 ``(clip_frames, size, size, 3)`` of sample ``i`` (BadRecordError if unreadable)."""
        idx = sample_frame_indices(self.num_frames(i), self.clip_frames, self.sample_rate, rng)
        return resize_frames(read_video_frames(self.labelset.video_paths[i], idx), self.size)

    def batch_indices(self, batch_size: int, *, shuffle: bool, seed: int,
                      drop_last: bool = False) -> list[np.ndarray]:
        """The sample indices of every batch of one pass of :meth:`batches` (nothing decoded)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = np.arange(len(self))
        if shuffle:
            order = np.random.default_rng(seed).permutation(order)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        return [order[s:s + batch_size] for s in range(0, stop, batch_size)]

    def batches(self, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool = False,
                start_batch: int = 0, num_threads: int = 4, prefetch: int = 2, pad: bool = False,
                rows: slice | None = None) -> grain.DatasetIterator:
        """A grain iterator of ``(clips uint8 (B, T, S, S, 3), labels (B, ...))``.

        Order and clips derive from ``seed`` and the sample index only, so ``start_batch``
        resumes a pass exactly without decoding the batches before. ``pad`` repeats the last
        sample to fill a short batch; ``rows`` keeps those rows of every batch (this process's
        part in a multi-host run).
        """
        chunks = self.batch_indices(batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
        if not 0 <= start_batch <= len(chunks):
            raise ValueError(f"start_batch {start_batch} outside [0, {len(chunks)}] "
                             f"({len(self)} samples in batches of {batch_size})")
        if pad:
            chunks = [np.concatenate([c, np.repeat(c[-1:], batch_size - len(c))]) for c in chunks]
        if rows is not None:
            chunks = [c[rows] for c in chunks]

        def load(chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            clips = [self.clip(int(i), np.random.default_rng((seed, int(i)))) for i in chunk]
            return np.stack(clips), self.labelset.labels[chunk]

        dataset = grain.MapDataset.source(chunks[start_batch:]).map(load)
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        return iter(dataset.to_iter_dataset(options))
