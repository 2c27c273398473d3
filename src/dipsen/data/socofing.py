"""SOCOFing fingerprints (Shehu et al. 2018) from the original BMP files or this package's cache of them.

Task (``task``, one of :data:`TASKS`), from a 28x28 grayscale image: ``hand-finger`` (the default: 10
classes, ``Left_thumb`` ... ``Right_little``), ``gender`` (``female``, ``male``), ``hand`` (``Left``,
``Right``) or ``finger`` (``thumb`` ... ``little``). Every task uses the same subject split, so a seed gives
the same train and test images whatever is predicted. Gender is unbalanced (4,770 of the 6,000 real images
are male), so ``info["majority_rate"]`` gives the accuracy of always answering the test split's most
frequent class.

Originals are read from a folder (searched recursively for ``*.BMP``) or a ``.tar`` / ``.tar.gz`` archive,
named ``<subject>__<M|F>_<Left|Right>_<finger>_finger[_CR|_Obl|_Zcut].BMP`` (the suffix marks the
Altered-* variants of the full download). Each image is converted to grayscale with PIL's ``convert("L")``
(the RGBA files' alpha only masks a 4-pixel black frame, so it is ignored) and resized to 28x28 with the
Lanczos filter, which antialiases when shrinking. The 241x298 files are resized the same way, so their
aspect ratio changes slightly more than the 96x103 ones'.

The embedded default is ``embedded/socofing/socofing_real_28x28.npz``, built from the 6,000 real originals
by :func:`build_socofing_cache`. Loading it and loading the originals go through the same split code
(:mod:`dipsen.data.socofing_split`).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from dipsen.data._io import describe_file, embedded_dir, sha256_hex, write_atomic
from dipsen.data.dataset import Dataset
from dipsen.data.socofing_split import _duplicate_groups, split_by_subject
from dipsen.errors import ConfigError, DataError

HANDS = ("Left", "Right")
FINGERS = ("thumb", "index", "middle", "ring", "little")
CLASSES = tuple(f"{hand}_{finger}" for hand in HANDS for finger in FINGERS)
GENDERS = {"F": "female", "M": "male"}  # file-name letter -> class name
VARIANTS = ("", "CR", "Obl", "Zcut")  # "" = real; the others are the Altered-* alterations
SIDE = 28
CACHE_NAME = "socofing_real_28x28.npz"
EMBEDDED_CACHE = embedded_dir("socofing") / CACHE_NAME
CACHE_FIELDS = ("images", "subject", "gender", "hand", "finger", "variant", "sha256", "source")
NAME_PATTERN = re.compile(
    r"(?P<subject>\d+)__(?P<gender>[MF])_(?P<hand>Left|Right)_(?P<finger>thumb|index|middle|ring|little)"
    r"_finger(?:_(?P<variant>CR|Obl|Zcut))?\.bmp",
    re.IGNORECASE,
)
PREPROCESSING = {
    "grayscale": "PIL convert('L') (ITU-R 601 luma; alpha ignored)",
    "resize": f"PIL resize to {SIDE}x{SIDE}, Image.Resampling.LANCZOS, aspect ratio not kept",
    "dtype": "uint8 in the cache; float32 / 255 in the Dataset",
}

Records = dict[str, np.ndarray]

TASKS: dict[str, tuple[tuple[str, ...], Callable[[Records], list[str]]]] = {
    # task: (classes, class name of each record); label = index of the name in classes
    "hand-finger": (CLASSES, lambda r: [f"{h}_{f}" for h, f in zip(r["hand"], r["finger"], strict=True)]),
    "gender": (tuple(GENDERS.values()), lambda r: [GENDERS[str(g)] for g in r["gender"]]),
    "hand": (HANDS, lambda r: [str(h) for h in r["hand"]]),
    "finger": (FINGERS, lambda r: [str(f) for f in r["finger"]]),
}
"""The tasks ``load_socofing`` can predict (``dipsen.data.SOCOFING_TASKS`` lists the same names)."""


def parse_name(name: str, origin: str) -> dict:
    """Subject id, gender, hand, finger and variant from a SOCOFing file name; DataError naming ``origin``."""
    match = NAME_PATTERN.fullmatch(name)
    if match is None:
        raise DataError(f"{origin}: not a SOCOFing file name (expected <subject>__<M|F>_<Left|Right>_<finger>_finger.BMP)")
    fields = match.groupdict()
    # Normalise case so that labels do not depend on how a copy spelled the name.
    return {
        "subject": int(fields["subject"]),
        "gender": fields["gender"].upper(),
        "hand": fields["hand"].capitalize(),
        "finger": fields["finger"].lower(),
        "variant": next(v for v in VARIANTS if v.lower() == (fields["variant"] or "").lower()),
    }


def decode_image(data: bytes, origin: str, side: int = SIDE) -> np.ndarray:
    """(side, side) uint8 grayscale thumbnail of BMP bytes; DataError naming ``origin`` if they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "BMP":
                raise DataError(f"{origin}: not a BMP image (found {image.format or 'unknown format'})")
            image.load()
            gray = image.convert("L").resize((side, side), Image.Resampling.LANCZOS)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{origin}: cannot decode BMP image: {exc}") from None
    return np.asarray(gray, dtype=np.uint8)


def read_originals(source: Path, side: int = SIDE) -> Records:
    """Records of every SOCOFing BMP under ``source`` (a folder or a tar archive), in a fixed order.

    Images are ``side`` x ``side`` thumbnails (:func:`decode_image`); the cache and the embedded data
    set always use :data:`SIDE`.

    A folder is searched recursively for ``*.BMP``; if it holds none, the ``*.tar.gz``/``*.tgz``/``*.tar``
    archives in it are read instead. Other files are ignored. Records are sorted by subject, hand,
    finger, variant and source name, so the result does not depend on how the files were stored.
    """
    if not Path(source).exists():
        raise DataError(f"{source}: no such file or folder")
    rows = []
    for origin, name, data in _iter_files(Path(source)):
        row = parse_name(name.rsplit("/", 1)[-1], origin)
        row.update(images=decode_image(data, origin, side), sha256=sha256_hex(data), source=name)
        rows.append(row)
    if not rows:
        raise DataError(f"{source}: no SOCOFing BMP files found")
    rows.sort(
        key=lambda r: (
            r["subject"],
            HANDS.index(r["hand"]),
            FINGERS.index(r["finger"]),
            VARIANTS.index(r["variant"]),
            r["source"],
        )
    )
    records = {field: np.array([row[field] for row in rows]) for field in CACHE_FIELDS}
    records["subject"] = records["subject"].astype(np.int32)
    return records


def build_socofing_cache(source: Path, out: Path) -> Path:
    """Write the compact cache of the originals under ``source`` to ``out`` and return its path.

    ``out`` may be a folder, in which case the file is ``out/socofing_real_28x28.npz``. The file appears
    complete or not at all. It holds, per image: the 28x28 uint8 image, subject, gender, hand, finger,
    variant ("" for real images), the sha256 of the original file bytes and the source name.
    """
    out = Path(out)
    if out.is_dir():
        out = out / CACHE_NAME
    records = read_originals(Path(source))
    count = len(records["subject"])
    meta = {**PREPROCESSING, "pillow": PIL.__version__, "source": Path(source).name, "count": count}
    arrays = {"meta": np.array(json.dumps(meta)), **records}
    write_atomic(out, lambda f: np.savez_compressed(f, allow_pickle=False, **arrays))
    return out


def read_cache(path: Path) -> tuple[Records, dict]:
    """Records and build metadata from a cache written by :func:`build_socofing_cache`.

    Raises DataError naming the file if it is missing, not a cache, or its arrays are inconsistent.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in (*CACHE_FIELDS, "meta") if key not in npz.files]
            if missing:
                raise DataError(f"{path}: not a SOCOFing cache: missing arrays {', '.join(missing)}")
            records = {field: npz[field] for field in CACHE_FIELDS}
            meta = json.loads(str(npz["meta"]))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read SOCOFing cache: {exc}") from None
    n = len(records["subject"])
    if records["images"].shape != (n, SIDE, SIDE) or records["images"].dtype != np.uint8:
        shape = records["images"].shape
        raise DataError(f"{path}: images must be uint8 ({n}, {SIDE}, {SIDE}), found {shape}")
    if any(len(records[field]) != n for field in CACHE_FIELDS):
        raise DataError(f"{path}: arrays have different lengths")
    if not (np.isin(records["hand"], HANDS).all() and np.isin(records["finger"], FINGERS).all()):
        raise DataError(f"{path}: unknown hand or finger value")
    if not np.isin(records["gender"], list(GENDERS)).all():
        raise DataError(f"{path}: unknown gender value (expected {' or '.join(GENDERS)})")
    return records, meta


def load_socofing(data_dir: Path | None = None, *, seed: int = 0, task: str = "hand-finger", side: int = SIDE) -> Dataset:
    """The ``task`` (one of :data:`TASKS`), split by subject with ``seed`` (see :mod:`dipsen.data.socofing_split`).

    ``data_dir`` may be None (the embedded cache), a ``.npz`` cache, a folder of originals or a tar archive
    of them. Images are ``side`` x ``side``; a ``side`` other than :data:`SIDE` needs the originals (caches
    hold 28x28 images only). Guarantees: no subject and no image content (sha256 of the original file) in
    both splits, and the same split (same images in train and test) for every task and side.
    ``info["majority_rate"]`` is the share of ``info["majority_class"]``, the most frequent class of the
    test split (None for an empty test split).
    """
    if task not in TASKS:
        raise ConfigError(f"socofing_task must be one of {', '.join(TASKS)}, got {task!r}")
    classes, names_of = TASKS[task]
    if side < 1:
        raise ConfigError(f"SOCOFing image side must be a positive integer, got {side}")
    if data_dir is None or Path(data_dir).suffix == ".npz":
        if side != SIDE:
            raise ConfigError(f"SOCOFing caches hold {SIDE}x{SIDE} images; side {side} needs the originals")
        path = EMBEDDED_CACHE if data_dir is None else Path(data_dir)
        records, meta = read_cache(path)
        source: dict[str, object] = {"cache": describe_file(path), "built_with": meta}
        if data_dir is None:
            source["embedded"] = True
    else:
        records = read_originals(Path(data_dir), side)
        resize = PREPROCESSING["resize"].replace(f"{SIDE}x{SIDE}", f"{side}x{side}")
        source = {"originals": str(data_dir), "preprocessing": {**PREPROCESSING, "resize": resize}}
    split = split_by_subject(records, seed=seed)
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[name] for name in names_of(records)], dtype=np.int64)
    images = records["images"][:, None].astype(np.float32) / np.float32(255)
    counts = {
        name: np.bincount(labels[idx], minlength=len(classes)).tolist()
        for name, idx in (("train", split.train), ("test", split.test))
    }
    test_total = sum(counts["test"])
    majority = int(np.argmax(counts["test"]))
    info = {
        "source": source,
        "task": task,
        "labels": f"index in classes ({', '.join(classes)})",
        "variants": {v or "real": int((records["variant"] == v).sum()) for v in VARIANTS},
        **split.info,
        "class_counts": counts,
        "majority_class": classes[majority] if test_total else None,
        "majority_rate": counts["test"][majority] / test_total if test_total else None,
        # identical images kept once (same hand x finger) whose copies carry another label for this task
        "label_conflicts_kept": _label_conflicts(records, labels, np.concatenate([split.train, split.test])),
    }
    return Dataset(
        "socofing",
        images[split.train],
        labels[split.train],
        images[split.test],
        labels[split.test],
        classes=classes,
        info=info,
    )


def _label_conflicts(records: Records, labels: np.ndarray, kept: np.ndarray) -> list[list[str]]:
    """Source names of each group of identical images that kept a copy although its labels differ."""
    kept_mask = np.zeros(len(labels), dtype=bool)
    kept_mask[kept] = True
    return [
        records["source"][idx].tolist()
        for idx in _duplicate_groups(records["sha256"])
        if kept_mask[idx].any() and len(set(labels[idx].tolist())) > 1
    ]


def _iter_files(source: Path) -> Iterator[tuple[str, str, bytes]]:
    """(origin for messages, name relative to the source, bytes) of each BMP file in ``source``."""
    if source.is_file():
        yield from _iter_archive(source, prefix="")
        return
    bmps = sorted(p for p in source.rglob("*") if p.suffix.lower() == ".bmp" and p.is_file())
    if bmps:
        for path in bmps:
            try:
                yield str(path), path.relative_to(source).as_posix(), path.read_bytes()
            except OSError as exc:
                raise DataError(f"{path}: cannot read file: {exc.strerror or exc}") from None
        return
    suffixes = (".tar.gz", ".tgz", ".tar")
    archives = sorted(p for p in source.rglob("*") if p.name.endswith(suffixes) and p.is_file())
    for archive in archives:
        yield from _iter_archive(archive, prefix=archive.relative_to(source).as_posix() + ":")


def _iter_archive(archive: Path, prefix: str) -> Iterator[tuple[str, str, bytes]]:
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(".bmp"):
                    stream = tar.extractfile(member)
                    if stream is None:  # isfile() members always have one; keeps the type checker honest
                        continue
                    data = stream.read()
                    yield f"{archive}:{member.name}", prefix + member.name, data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{archive}: cannot read tar archive: {exc}") from None
