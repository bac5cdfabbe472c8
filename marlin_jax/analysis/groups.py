"""Feature files and group assignment for the statistics.

Feature files are the ``.npy`` arrays written by ``python -m marlin_jax.extract``: one per video,
``(n_clips, D)`` (or ``(D,)`` for reduced features, read as one clip). A video's id is its file
name without extension. Groups come from a metadata table (CSV/TSV/Excel, one row per video) or
from one folder per group (e.g. pre/post).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_GROUP_COLUMN",
    "FeatureGroups",
    "groups_from_args",
    "groups_from_dirs",
    "groups_from_metadata",
    "load_feature_dir",
    "load_feature_file",
    "read_metadata",
    "video_id",
]

_STRIP_SUFFIXES = {".npy", ".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
DEFAULT_GROUP_COLUMN = "outcome"  # the feature-analysis fork's metadata column
_ID_COLUMNS = ("video", "video_id", "filename", "file", "name", "id", "path")


def video_id(name: str | os.PathLike) -> str:
    """The id of a video or feature file: its base name without a video/.npy extension
    (``"a/b/clip.01.mp4"`` -> ``"clip.01"``)."""
    base = Path(str(name).strip()).name
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in _STRIP_SUFFIXES else base


def load_feature_file(path: str | os.PathLike) -> np.ndarray:
    """Loads one feature file as float64 ``(n_clips, D)``; ``(D,)`` becomes ``(1, D)``."""
    path = Path(path)
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from e
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{path}: expected features (n_clips, D) or (D,), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{path}: empty feature array of shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{path}: expected a numeric array, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{path}: features contain NaN or infinite values")
    return x


def load_feature_dir(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads every ``.npy`` under ``directory`` (recursively): ``{video id: (n_clips, D)}``.

    Raises ValueError when the folder is missing or empty, two files share an id, or the
    files disagree on ``D``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: feature folder does not exist")
    files = sorted(directory.rglob("*.npy"))
    if not files:
        raise ValueError(f"{directory}: no .npy feature files found")
    out: dict[str, np.ndarray] = {}
    where: dict[str, Path] = {}
    for f in files:
        vid = video_id(f)
        if vid in out:
            raise ValueError(f"{f}: same video id {vid!r} as {where[vid]}; ids must be unique")
        out[vid], where[vid] = load_feature_file(f), f
    dims = {v.shape[1] for v in out.values()}
    if len(dims) > 1:
        by_dim = {d: next(str(where[k]) for k, v in out.items() if v.shape[1] == d) for d in dims}
        raise ValueError(f"{directory}: feature files disagree on the feature size: {by_dim}")
    return out


def read_metadata(path: str | os.PathLike):
    """Reads a metadata table (``.csv``, ``.tsv``/``.txt``, ``.xlsx``/``.xlsm``) as a pandas
    DataFrame."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: metadata file does not exist")
    ext = path.suffix.lower()
    readers = {".xlsx": lambda: pd.read_excel(path, engine="openpyxl"), ".csv": lambda: pd.read_csv(path),
               ".tsv": lambda: pd.read_csv(path, sep="\t")}
    readers[".xlsm"], readers[".txt"] = readers[".xlsx"], readers[".tsv"]
    if ext not in readers:
        raise ValueError(f"{path}: unsupported metadata format {ext!r} (use .csv, .tsv, .xlsx)")
    try:
        df = readers[ext]()
    except Exception as e:  # pandas/openpyxl raise many types for a corrupt file
        raise ValueError(f"{path}: cannot read metadata table ({type(e).__name__}: {e})") from e
    if df.empty:
        raise ValueError(f"{path}: metadata table has no rows")
    return df


@dataclasses.dataclass
class FeatureGroups:
    """Two groups of videos: ``features[g]`` maps video id -> ``(n_clips, D)`` for group g.

    ``notes`` records what was dropped or assumed while assigning groups (for the report).
    """

    names: tuple[str, str]
    features: dict[str, dict[str, np.ndarray]]
    source: str
    notes: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        for g in self.names:
            if not self.features.get(g):
                raise ValueError(f"group {g!r} has no videos ({self.source})")
        dims = {x.shape[1] for g in self.names for x in self.features[g].values()}
        if len(dims) != 1:
            raise ValueError(f"groups disagree on the feature size: {sorted(dims)} ({self.source})")

    @property
    def dim(self) -> int:
        return next(iter(self.features[self.names[0]].values())).shape[1]

    def samples(self, g: str, level: str) -> np.ndarray:
        """Group ``g`` at ``level``: ``"clip"``, all clips stacked ``(total clips, D)``, or
        ``"video"``, one row per video, the mean over its clips ``(n_videos, D)``."""
        if level == "clip":
            return np.concatenate(list(self.features[g].values()), axis=0)
        if level == "video":
            return np.stack([x.mean(0) for x in self.features[g].values()])
        raise ValueError(f"level must be 'clip' or 'video', got {level!r}")

    def paired(self) -> tuple[np.ndarray, np.ndarray]:
        """Video-level means of the ids present in both groups (in group a's order):
        ``(a (n_pairs, D), b (n_pairs, D))``, row i of both from the same id."""
        fa, fb = (self.features[g] for g in self.names)
        ids = [vid for vid in fa if vid in fb]
        return tuple(np.array([f[v].mean(0) for v in ids]).reshape(len(ids), self.dim) for f in (fa, fb))

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            g: {
                "videos": len(self.features[g]),
                "clips": int(sum(x.shape[0] for x in self.features[g].values())),
            }
            for g in self.names
        }


def groups_from_dirs(dirs: Mapping[str, str | os.PathLike]) -> FeatureGroups:
    """One folder of ``.npy`` files per group, e.g. ``{"pre": F1, "post": F2}`` (two groups)."""
    if len(dirs) != 2:
        raise ValueError(f"need exactly two group folders, got {len(dirs)}: {list(dirs)}")
    names = tuple(dirs)
    feats = {g: load_feature_dir(d) for g, d in dirs.items()}
    notes = []
    shared = sorted(set(feats[names[0]]) & set(feats[names[1]]))
    if shared:
        notes.append(
            f"{len(shared)} video id(s) appear in both groups (e.g. {shared[:3]}): if they are the "
            "same subjects measured twice, the groups are paired; the independent-samples tests "
            "ignore the pairing, and the paired level (--levels paired: Wilcoxon signed-rank "
            "on each id's pre/post video means) usually has more power."
        )
    src = ", ".join(f"{g}={d}" for g, d in dirs.items())
    return FeatureGroups(names, feats, f"folders {src}", notes)  # type: ignore[arg-type]


def groups_from_metadata(
    features: Mapping[str, np.ndarray],
    meta,
    group_column: str,
    *,
    id_column: str | None = None,
    groups: Sequence[str] | None = None,
    meta_name: str = "metadata",
) -> FeatureGroups:
    """Assigns feature files to groups by a metadata table's ``group_column``.

    ``meta`` is a DataFrame with one row per video; ``id_column`` names the video (a file name
    with or without extension or folder, matched by :func:`video_id`). Group values are compared
    as strings; ``groups`` picks two of them (required when the column holds more than two).
    Videos without features and features without a row are listed in ``notes``.
    """
    cols = [str(c) for c in meta.columns]
    meta = meta.set_axis(cols, axis=1)
    for c in (group_column, id_column or group_column):
        if c not in cols:
            raise ValueError(f"{meta_name}: no column {c!r}; columns are {cols}")
    if id_column is None:
        lower = {c.lower(): c for c in cols}
        id_column = next((lower[c] for c in _ID_COLUMNS if c in lower), None)
        if id_column is None:
            raise ValueError(f"{meta_name}: cannot tell which column names the videos; pass --id_column "
                             f"(columns are {cols})")
    meta = meta[[id_column, group_column]].dropna()
    ids = [video_id(v) for v in meta[id_column].astype(str)]
    values = [_group_value(v) for v in meta[group_column]]
    dup = [v for v, count in Counter(ids).items() if count > 1]
    if dup:
        raise ValueError(f"{meta_name}: videos listed more than once: {dup[:5]}")
    present = sorted(set(values))
    if groups is None:
        if len(present) != 2:
            raise ValueError(
                f"{meta_name}: column {group_column!r} has {len(present)} values {present}; "
                "pass --groups A B to pick the two to compare"
            )
        names = (present[0], present[1])
    else:
        names = (str(groups[0]), str(groups[1]))
        missing = [g for g in names if g not in present]
        if missing:
            raise ValueError(f"{meta_name}: group value(s) {missing} not in column {group_column!r} {present}")
    feats: dict[str, dict[str, np.ndarray]] = {g: {} for g in names}
    no_features = []
    for vid, g in zip(ids, values, strict=True):
        if g in feats and vid in features:
            feats[g][vid] = features[vid]
        elif g in feats:
            no_features.append(vid)
    left_out = ((no_features, "video(s) in the metadata have no feature file"),
                (sorted(set(features) - set(ids)), "feature file(s) have no metadata row"))
    notes = [f"{len(vids)} {what} and were left out (e.g. {vids[:5]})" for vids, what in left_out if vids]
    return FeatureGroups(names, feats, f"{meta_name} column {group_column!r}", notes)


def _group_value(v) -> str:
    """Group labels as strings; a float that is an integer (1.0 from Excel) reads as "1"."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def groups_from_args(args: argparse.Namespace) -> FeatureGroups:
    """Builds the groups from the statistics CLI's arguments (metadata table or folders); the
    group column defaults to :data:`DEFAULT_GROUP_COLUMN`."""
    dirs: dict[str, str] = {}
    for spec in args.group_dir or []:
        name, sep, d = spec.partition("=")
        if not sep or not name or not d:
            raise ValueError(f"--group_dir expects NAME=DIR, got {spec!r}")
        dirs[name] = d
    dirs |= {name: d for name, d in (("pre", args.pre_dir), ("post", args.post_dir)) if d}
    if dirs:
        if args.meta or args.features_dir:
            raise ValueError("give either group folders or --features_dir with --meta, not both")
        return groups_from_dirs(dirs)
    if not (args.features_dir and args.meta):
        raise ValueError(
            "give --features_dir and --meta (with --group_column; default: outcome), or two "
            "group folders (--group_dir NAME=DIR twice, or --pre_dir and --post_dir)"
        )
    features = load_feature_dir(args.features_dir)
    return groups_from_metadata(features, read_metadata(args.meta), args.group_column or DEFAULT_GROUP_COLUMN,
                                id_column=args.id_column, groups=args.groups, meta_name=str(args.meta))
