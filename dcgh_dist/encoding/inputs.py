"""What an encoding run reads: a dataset in the project's format, or plain Parquet."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dcgh_dist.data.format import INFO_FILE, DatasetError, DatasetInfo, list_data_files, read_dataset_info
from dcgh_dist.storage import exists, join, resolve_filesystem

MODALITIES = ("image", "text")


@dataclass
class EncodeInput:
    uri: str
    info: DatasetInfo
    files: list[str]  # filesystem paths, sorted; file #i -> part-{i:05d}
    project_format: bool  # dataset.json present


def resolve_input(uri: str, s3_endpoint: str | None = None) -> EncodeInput:
    """A dataset in the project's format, or plain Parquet (a file or a directory/prefix of
    files) with ``id`` and an ``image``/``text`` (or ``*_features``) column."""
    fs, root = resolve_filesystem(uri, s3_endpoint)
    if root.endswith(".parquet"):
        if not exists(fs, root):
            raise DatasetError(f"{uri}: no such Parquet file")
        files = [root]
    else:
        files = list_data_files(uri, s3_endpoint)
    if not root.endswith(".parquet") and exists(fs, join(root, INFO_FILE)):
        return EncodeInput(uri, read_dataset_info(uri, s3_endpoint), files, True)
    schema = pq.read_schema(files[0], filesystem=fs)
    names = set(schema.names)
    if "id" not in names:
        raise DatasetError(f"{files[0]}: plain Parquet input needs an 'id' column, has {schema.names}")
    image = "image" if "image" in names else "image_features" if "image_features" in names else None
    text = "text" if "text" in names else "text_features" if "text_features" in names else None
    if image is None and text is None:
        raise DatasetError(
            f"{files[0]}: plain Parquet input needs an image column ('image' bytes or "
            f"'image_features') or a text column ('text' or 'text_features'); has {schema.names}"
        )
    info = DatasetInfo(
        name=os.path.basename(root.rstrip("/")) or "parquet", num_classes=1, class_names=("unlabelled",),
        image_column=image or "image", text_column=text or "text",
        extra={"plain_parquet": True, "has_image": image is not None, "has_text": text is not None},
    )
    return EncodeInput(uri, info, files, False)


def count_rows(fs: pafs.FileSystem, path: str, splits: Sequence[str] | None, where: str) -> int:
    """Rows of one input file that the run encodes (all, or those of ``splits``)."""
    if splits is None:
        return pq.ParquetFile(path, filesystem=fs).metadata.num_rows
    try:
        col = pq.read_table(path, filesystem=fs, columns=["split"]).column("split")
    except (KeyError, pa.ArrowInvalid) as e:
        raise DatasetError(f"{where}: --splits needs a 'split' column ({e})") from e
    return int(pc.sum(pc.is_in(col, value_set=pa.array(list(splits)))).as_py() or 0)


def check_columns(inp: EncodeInput, meta, modalities: Sequence[str]) -> DatasetInfo:
    """The input must hold the form of each modality the model takes (bytes/text for CLIP
    towers, feature vectors for feature towers); returns the info the preprocessor uses."""
    info = inp.info
    family = meta.config.model.family
    want = {"image": "image" if family == "clip" else "image_features",
            "text": "text" if family == "clip" else "text_features"}
    have = {"image": info.image_column, "text": info.text_column}
    for m in modalities:
        present = info.extra.get(f"has_{m}", True) if not inp.project_format else True
        if not present or have[m] != want[m]:
            raise DatasetError(
                f"{inp.uri}: the checkpoint's {family} model encodes {m} from column {want[m]!r}, "
                f"but the input has {have[m] if present else 'no ' + m + ' column'}"
            )
    if family == "features":
        info = replace(info, image_feature_dim=meta.dataset_info.image_feature_dim,
                       text_feature_dim=meta.dataset_info.text_feature_dim)
    return info
