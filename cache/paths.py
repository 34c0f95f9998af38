"""Where a backbone's feature file and shards live, and the refusal of a missing one: light (no h5py, no
numpy), so that a missing cache answers before anything heavy loads."""

from pathlib import Path

from cxr14.errors import Fix, InputError


def cache_path(cache_dir: Path, backbone: str) -> Path:
    return Path(cache_dir) / f"{backbone}.h5"


def shard_dir(cache_dir: Path, backbone: str) -> Path:
    return Path(cache_dir) / f"{backbone}.shards"


def refuse_folder(path: Path) -> None:
    """A folder where a feature file belongs is named as one: not 'not found', not an HDF5 error."""
    if Path(path).is_dir():
        raise InputError(
            f"{path} is a folder, not a feature file; move it out of the way (a feature file is written there)"
        )


def cache_file(cache_dir: Path, backbone: str) -> Path:
    """The path of backbone's feature file, or an error saying how to make it."""
    path = cache_path(cache_dir, backbone)
    refuse_folder(path)
    if not path.is_file():
        pending = shard_dir(cache_dir, backbone)
        if pending.is_dir():
            raise InputError(
                f"no feature cache for backbone {backbone!r} ({path} not found): its shards in {pending} "
                "are not merged yet; finish the extraction, or merge the shards"
            ).fixed_by(Fix("merge", {"backbone": backbone}))
        raise InputError(
            f"no feature cache for backbone {backbone!r} ({path} not found); extract it first"
        ).fixed_by(Fix("extract", {"backbone": backbone}))
    return path


def check_shards(cache_dir: Path, backbone: str) -> Path:
    """The folder of backbone's finished shards, or an error saying to extract them."""
    directory = shard_dir(cache_dir, backbone)
    if not any(directory.glob("*.h5")):
        raise InputError(f"{directory}: no finished shards to merge; extract first").fixed_by(
            Fix("extract", {"backbone": backbone})
        )
    return directory
