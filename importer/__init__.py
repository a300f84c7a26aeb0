"""diskflow's import side: get a disk image from a URL or path into a file or block device.

from importer import import_image, ImportOptions, probe
result = import_image("https://example.com/disk.qcow2.xz", "/data/disk.img",
                      options=ImportOptions(size=10 << 30))
probe("https://example.com/disk.qcow2.xz").needs_scratch   # False: qcow2 streams (vhdx: True)
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importer.checksum import Checksum
    from importer.errors import Failure, FinalError, TransientError
    from importer.pipeline import (
        ContentType,
        ImportOptions,
        ImportResult,
        Probe,
        import_image,
        probe,
        usable_capacity,
    )
    from importer.progress import Progress
    from importer.sources import HttpOptions, S3Options

# Each name's module, imported on first use: importing any importer.* module runs this file
# first, and a command that needs only importer.errors should not load the whole pipeline.
_EXPORTS = {
    "Checksum": "importer.checksum",
    "ContentType": "importer.pipeline",
    "FinalError": "importer.errors",
    "HttpOptions": "importer.sources",
    "Failure": "importer.errors",
    "ImportOptions": "importer.pipeline",
    "ImportResult": "importer.pipeline",
    "Probe": "importer.pipeline",
    "Progress": "importer.progress",
    "S3Options": "importer.sources",
    "TransientError": "importer.errors",
    "import_image": "importer.pipeline",
    "probe": "importer.pipeline",
    "usable_capacity": "importer.pipeline",
}

__all__ = [
    "Checksum",
    "ContentType",
    "Failure",
    "FinalError",
    "HttpOptions",
    "ImportOptions",
    "ImportResult",
    "Probe",
    "Progress",
    "S3Options",
    "TransientError",
    "import_image",
    "probe",
    "usable_capacity",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'importer' has no attribute {name!r}")
    __import__(module)  # not importlib.import_module: -X importtime reports this one
    value = getattr(sys.modules[module], name)
    globals()[name] = value  # once found, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
