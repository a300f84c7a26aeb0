"""Every reason an import can fail for: the vocabulary the termination message, the CLI's
`error: MESSAGE [Reason]` line and (later) a DataVolume's status share.

Each reason is final (retrying the same import cannot help: exit 1) or transient (it may
work later: exit 75), never both, so a controller can decide from the reason alone. The
README's table of reasons and a test (tests/importer/test_reasons.py) keep the three in step.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why an import failed."""

    # The source
    NOT_FOUND = "NotFound"
    UNAUTHORIZED = "Unauthorized"
    FORBIDDEN = "Forbidden"
    GONE = "Gone"
    NO_CREDENTIALS = "NoCredentials"
    WRONG_REGION = "WrongRegion"
    S3_ERROR = "S3Error"
    HTTP_ERROR = "HttpError"
    TLS_ERROR = "TLSError"
    TOO_MANY_REDIRECTS = "TooManyRedirects"
    INVALID_URL = "InvalidURL"
    INVALID_SOURCE = "InvalidSource"
    READ_ERROR = "ReadError"
    HTML_INSTEAD_OF_IMAGE = "HtmlInsteadOfImage"
    # The transfer (transient)
    SERVER_ERROR = "ServerError"
    CONNECTION_FAILED = "ConnectionFailed"
    CONNECTION_LOST = "ConnectionLost"
    TRUNCATED = "Truncated"
    TOO_SLOW = "TooSlow"
    BAD_CONTENT_RANGE = "BadContentRange"
    SOURCE_CHANGED = "SourceChanged"
    # The image
    CHECKSUM_MISMATCH = "ChecksumMismatch"
    CORRUPT_COMPRESSED_DATA = "CorruptCompressedData"
    UNSUPPORTED_FORMAT = "UnsupportedFormat"
    INVALID_IMAGE = "InvalidImage"
    TRUNCATED_IMAGE = "TruncatedImage"
    BACKING_FILE_REJECTED = "BackingFileRejected"
    DATA_FILE_REJECTED = "DataFileRejected"
    IMAGE_TOO_LARGE = "ImageTooLarge"
    EXPANSION_LIMIT = "ExpansionLimit"
    UNSAFE_ARCHIVE = "UnsafeArchive"
    INVALID_ARCHIVE = "InvalidArchive"
    CONVERSION_FAILED = "ConversionFailed"
    NEEDS_SCRATCH = "NeedsScratch"
    # The destination and this machine
    INVALID_DESTINATION = "InvalidDestination"
    DESTINATION_BUSY = "DestinationBusy"
    NO_SPACE = "NoSpace"
    IO_ERROR = "IOError"
    RESOURCE_LIMIT = "ResourceLimit"
    TIMED_OUT = "TimedOut"
    ADDRESS_IN_USE = "AddressInUse"
    MISSING_TOOL = "MissingTool"
    # The run
    INVALID_ARGUMENT = "InvalidArgument"
    INVALID_MANIFEST = "InvalidManifest"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    TERMINATED = "Terminated"
    CANCELLED = "Cancelled"
    INTERNAL_ERROR = "InternalError"
    # The importer pod, as the controller sees it
    POD_LOST = "PodLost"
    EVICTED = "Evicted"
    OOM_KILLED = "OOMKilled"
    STALLED = "Stalled"
    IMPORTER_CRASHED = "ImporterCrashed"
    RETRY_LIMIT_EXCEEDED = "RetryLimitExceeded"

    @property
    def final(self) -> bool:
        """True when retrying the same import cannot help."""
        return self not in _TRANSIENT


_TRANSIENT = frozenset(
    {
        Reason.SERVER_ERROR,
        Reason.CONNECTION_FAILED,
        Reason.CONNECTION_LOST,
        Reason.TRUNCATED,
        Reason.TOO_SLOW,
        Reason.BAD_CONTENT_RANGE,
        Reason.SOURCE_CHANGED,
        Reason.NEEDS_SCRATCH,  # tried again with scratch space
        Reason.TIMED_OUT,
        Reason.ADDRESS_IN_USE,
        Reason.TERMINATED,
        Reason.POD_LOST,
        Reason.EVICTED,
        Reason.OOM_KILLED,
        Reason.STALLED,
        Reason.IMPORTER_CRASHED,
    }
)
