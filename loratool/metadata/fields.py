"""Reading metadata fields."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


def parse_json_field(metadata: Mapping[str, str], key: str):
    """Decode a JSON-valued metadata field (``ss_tag_frequency``, ``ss_dataset_dirs``...); None if absent or broken."""
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return None


