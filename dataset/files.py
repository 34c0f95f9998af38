"""The data set's metadata CSV, found or refused: light (no numpy, no pandas), so that a data folder
without one answers before anything heavy loads."""

from pathlib import Path

from cxr14.errors import Fix, InputError

CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")


def find_csv(data_dir: Path, csv: str = "auto") -> Path:
    """The metadata CSV in `data_dir`: the named file, or with "auto" either official name (v2020 first)."""
    data_dir = Path(data_dir)
    if csv != "auto":
        path = data_dir / csv
        if not path.is_file():
            raise InputError(
                f"{path}: metadata CSV not found; check data.csv in the config and the data folder"
            )
        return path
    for name in CSV_NAMES:
        if (data_dir / name).is_file():
            return data_dir / name
    sample = sample_folder(data_dir)
    raise InputError(
        f"{data_dir}: no {' or '.join(CSV_NAMES)} found; point the data folder (--data-dir, or data.dir in "
        f"the config) at the ChestX-ray14 folder, or try the pipeline on a synthetic sample in a folder of "
        f"its own, then pass --data-dir {sample}"
    ).fixed_by(Fix("make-sample", {"out": str(sample)}))


def sample_folder(data_dir: Path) -> Path:
    """Where to suggest a synthetic sample: beside the data folder, never in it (that is where the real set
    goes, and a sample there would be taken for it)."""
    data_dir = Path(data_dir)
    return data_dir.parent / f"{data_dir.name or 'data'}-sample"
