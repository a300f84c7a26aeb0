"""diskflow's import side: get a disk image from a URL or path into a file or block device.

from importer import import_image, ImportOptions, probe
result = import_image("https://example.com/disk.qcow2.xz", "/data/disk.img",
                      options=ImportOptions(size=10 << 30))
probe("https://example.com/disk.qcow2.xz").needs_scratch   # True: qemu-img converts it
"""

from importer.checksum import Checksum
from importer.errors import FinalError, ImportFailure, TransientError
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

__all__ = [
    "Checksum",
    "ContentType",
    "FinalError",
    "HttpOptions",
    "ImportFailure",
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
