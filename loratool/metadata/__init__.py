"""Metadata: hashes, kohya / modelspec records, trigger words and training parameters.

    hashes.py    file hashes (sha256, AutoV2, addnet, legacy) and kohya's ``sshs_*`` hashes
    kohya.py     the arch ↔ version table, dates (``SOURCE_DATE_EPOCH``), record builders for every writer
    triggers.py  trigger words and tags from ``ss_tag_frequency`` and dataset folders
    training.py  readable training parameters (inspect)
    fields.py    reading JSON-valued fields
"""

from .fields import parse_json_field
from .hashes import (
    HashReport,
    addnet_hash,
    autov2,
    file_and_data_sha256,
    file_sha256,
    hash_report,
    kohya_hashes,
    legacy_hash,
    with_hashes,
)
from .kohya import (
    NETWORK_MODULE,
    arch_from_metadata,
    base_model_fields,
    conv_network_args,
    dim_text,
    iso_date,
    modelspec_fields,
    network_fields,
    now,
)
from .training import TrainingField, training_summary
from .triggers import (
    DreamboothFolder,
    TagShare,
    Triggers,
    dataset_folders,
    dreambooth_folder,
    rank_tags,
    tag_frequency,
    trigger_words,
)

__all__ = [
    "NETWORK_MODULE", "DreamboothFolder", "HashReport", "TagShare", "TrainingField", "Triggers", "addnet_hash",
    "arch_from_metadata", "autov2", "base_model_fields", "conv_network_args", "dataset_folders", "dim_text",
    "dreambooth_folder", "file_and_data_sha256", "file_sha256", "hash_report", "iso_date", "kohya_hashes",
    "legacy_hash", "modelspec_fields", "network_fields", "now", "parse_json_field", "rank_tags", "tag_frequency",
    "training_summary", "trigger_words", "with_hashes",
]
