"""Per-row status codes stored in every feature file (see cache/README.md)."""

from enum import IntEnum


class Status(IntEnum):
    """Why a row has (or lacks) features; stored as int8 in the `status` dataset."""

    OK = 0
    MISSING = 1  # no file for this image under the data dir
    EMPTY = 2  # file exists but has zero bytes
    TRUNCATED = 3  # PNG stream ends before its IEND chunk
    UNDECODABLE = 4  # bytes present but not a decodable PNG
    NOT_RUN = 5  # row not processed yet (only inside unfinished work)
