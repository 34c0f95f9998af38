#!/usr/bin/env python3
"""cxr14: frozen-backbone features for ChestX-ray14, cached once, then heads trained in minutes.

One CLI; each subcommand loads the config, calls one library function and prints.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

# Only light modules here: --help and argument errors answer before numpy or TensorFlow load.
from cache.paths import cache_file, check_shards
from cache.settings import FEATURE_DTYPES
from cxr14 import __version__
from cxr14.errors import Fix, InputError
from cxr14.settings import SEED_MAX, override
from cxr14.text import did_you_mean
from experiments.config import Config, load_config, with_training
from experiments.preflight import check_data, check_feature_files, check_run_inputs
from heads.settings import FUSIONS, HEAD_FIELDS, HEAD_KINDS, LOSSES, STARTS, TRAIN_FIELDS
from inference.settings import HEATMAP_METHODS
from results.settings import CALIBRATIONS, DECISION_FIELDS, OPERATING_POINTS

DEFAULT_CONFIG = Path(__file__).resolve().parent / "cxr14.toml"
ALL_FOLDERS = ("data", "cache", "runs")
# The folders each subcommand uses; also how a suggested command is completed with the folders the user
# passed. Every subcommand accepts all three folder flags, so that one set of them can be reused from
# command to command; one a command does not use is named in a note on stderr, never silently dropped.
COMMAND_FOLDERS = {
    "index": ("data",),
    "make-sample": (),
    "extract": ("data", "cache"),
    "merge": ("cache",),
    "train-head": ALL_FOLDERS,
    "evaluate": ALL_FOLDERS,
    "report": ("data", "runs"),
    "compare": ("data", "runs"),
    "sweep": ALL_FOLDERS,
    "curve": ALL_FOLDERS,
    "predict": ("runs",),
    "export": ("runs",),
    "demo": (),
    "bench": ("data", "cache"),
    "import-features": ("data", "cache"),
}
# Why a command that uses no folder needs none of the folder flags.
NO_FOLDERS_BECAUSE = {
    "make-sample": "it writes only to --out",
    "demo": "it writes everything under --workdir",
    "bench heads": "it writes synthetic features under --workdir",
    "bench import": "it writes a synthetic .npz and cache under --workdir",
    "bench tokens": "it writes a synthetic token cache under --workdir",
}


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line, with a close name where there is one; the full usage only with --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} --help)\n")

    def _check_value(self, action, value):
        # argparse's own check, with the close names added; subcommands are choices too.
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise argparse.ArgumentError(
                action,
                f"invalid choice: {value!r} (choose from {choices}){did_you_mean(value, action.choices)}",
            )


def _refuse_unknown(args, extras: list[str]) -> None:
    """Arguments the command does not take: one error line, with the command's close option names."""
    options = [o for o in args.parser._option_string_actions if o.startswith("--")]
    hints = "".join(did_you_mean(word.split("=")[0], options) for word in extras if word.startswith("-"))
    args.parser.error(f"unrecognized arguments: {' '.join(extras)}{hints}")


def _note_unused_folders(args) -> None:
    """A note on stderr naming the folder flags given that this command does not use."""
    unused = [f"--{f}-dir" for f in ALL_FOLDERS if getattr(args, f"{f}_dir") is not None]
    unused = [flag for flag in unused if flag[2:-4] not in args.folders]
    if not unused:
        return
    used = " and ".join(f"the {f} folder" for f in args.folders)
    because = f"it uses only {used}" if used else NO_FOLDERS_BECAUSE[args.parser.prog.removeprefix("run.py ")]
    print(f"note: {args.parser.prog} does not use {', '.join(unused)} ({because})", file=sys.stderr)


def _tensorflow(args) -> None:
    """Import TensorFlow now, quietly unless --verbose, before any library module imports it."""
    from cxr14.tf_logging import import_tensorflow

    import_tensorflow(verbose=args.verbose)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


@contextlib.contextmanager
def _results_only_on_stdout(args):
    """With --json, what the library prints while it works goes to stderr: stdout is one JSON document."""
    if getattr(args, "json", False):
        with contextlib.redirect_stdout(sys.stderr):
            yield
    else:
        yield


def suggested_command(fix: Fix, args) -> str:
    """The command of `fix` as the user would type it: the user's own command line when it is the same
    subcommand (plus what the fix adds, e.g. --force), else the fix's settings as flags plus the --config
    and folder flags the user passed that the command takes. Either way it works as printed."""
    words = ["python", "run.py"]
    # The user's own line only where it agrees with the fix (not, say, --backbone a,b for a fix of a).
    same = fix.command == args.command and all(
        getattr(args, key, None) in (None, False, value, (value,)) for key, value in fix.settings.items()
    )
    words += list(args.argv) if same else [fix.command]
    for key, value in fix.settings.items():
        flag = "--" + key.replace("_", "-")
        if flag not in words:
            words += [flag] if value is True else [flag, str(value)]
    if not same and Path(args.config).resolve() != DEFAULT_CONFIG:
        words += ["--config", str(args.config)]
    for folder in () if same else COMMAND_FOLDERS[fix.command]:
        value = getattr(args, f"{folder}_dir", None)
        if value is not None and f"--{folder}-dir" not in words:
            words += [f"--{folder}-dir", str(value)]
    return shlex.join(words)


def cmd_index(args, config: Config) -> None:
    check_data(config)  # a data folder without its CSV answers before pandas loads
    from dataset.index import count_missing, find_images, format_summary, summarize
    from dataset.splits import write_split_lists
    from experiments.data import open_config_dataset

    dataset = open_config_dataset(config)
    missing = None
    if args.check_images:
        missing = count_missing(find_images(config.data_dir, dataset.index.names))
    summary = summarize(dataset.index, dataset.splits, missing_images=missing, synthetic=dataset.synthetic)
    if args.write_splits:
        summary["written"] = [
            str(p) for p in write_split_lists(dataset.index, dataset.splits, args.write_splits)
        ]
    if args.json:
        _print_json(summary)
    else:
        print(format_summary(summary))
        if args.write_splits:
            print(f"wrote {', '.join(summary['written'])}")


def cmd_make_sample(args, config: Config) -> None:
    from dataset.sample import format_sample_summary, make_sample

    info = make_sample(
        args.out, images=args.images, size=args.size, seed=args.seed, label_names=config.labels
    )
    if args.json:
        _print_json(info)
        return
    print(format_sample_summary(info))
    print(f"next: {suggested_command(Fix('index', {'data_dir': args.out}), args)}")


def cmd_extract(args, config: Config) -> None:
    config = _with_extract_flags(args, config)
    for name in (*args.backbone, *([args.from_pixels] if args.from_pixels else [])):
        config.backbone(name)  # an unknown name fails before TensorFlow loads
    _check_extract_inputs(args, config)
    _tensorflow(args)
    from experiments.extract import format_extract_summary, run_extract

    with _results_only_on_stdout(args):
        summaries = run_extract(
            config,
            backbones=args.backbone,
            from_pixels=args.from_pixels,
            shard=args.shard,
            limit=args.limit,
            force=args.force,
        )
    if args.json:
        _print_json([dataclasses.asdict(summary) for summary in summaries])
    else:
        print("\n".join(format_extract_summary(summary) for summary in summaries))


def cmd_merge(args, config: Config) -> None:
    check_shards(config.cache_dir, args.backbone)
    _tensorflow(args)
    from extract.extraction import merge

    print(f"merged: {merge(cache_dir=config.cache_dir, backbone_name=args.backbone)}")


def cmd_train_head(args, config: Config) -> None:
    # Settings and names are checked before TensorFlow loads, so a mistake answers at once.
    options = {"options": dict(args.head_option)} if args.head_option else {}
    config = with_training(config, kind=args.head, **_flags(args, TRAIN_FIELDS + HEAD_FIELDS), **options)
    config = dataclasses.replace(config, decision=override(config.decision, **_flags(args, DECISION_FIELDS)))
    _check_tensorboard(args)
    from heads.run_folder import run_path

    # A runs folder that is a file, or a name that would leave it, is refused before anything else.
    run_path(config.runs_dir, args.name or "run")
    # A missing cache answers before h5py loads.
    check_feature_files(config, [name for name in args.backbone.split(",") if name.strip()])
    from experiments.experiment import plan_run, run_train_head

    plan = plan_run(config, kind=args.head, backbones=args.backbone)
    _tensorflow(args)
    with _results_only_on_stdout(args):
        metrics = run_train_head(
            config, kind=args.head, backbones=args.backbone, name=args.name, force=args.force, plan=plan
        )
    _print_result(args, metrics)


def cmd_evaluate(args, config: Config) -> None:
    from heads.run_folder import find_run

    run_dir = find_run(args.run, runs_dir=config.runs_dir)
    _check_head_trust(args, run_dir)
    check_run_inputs(config, run_dir)
    _tensorflow(args)
    if args.localization:
        from experiments.experiment import run_localization
        from inference.localization import format_pointing_game

        result = run_localization(
            config, run_dir=run_dir, bbox_csv=args.localization, split=args.split, method=args.heatmap_method
        )
        print(json.dumps(result, indent=2, default=str) if args.json else format_pointing_game(result))
        return
    from experiments.experiment import run_evaluate

    with _results_only_on_stdout(args):
        metrics = run_evaluate(config, run_dir=run_dir, split=args.split, expert=args.expert)
    _print_result(args, metrics)


def _check_head_trust(args, run_dir: Path) -> None:
    """A run whose head is code from a file loads only when the user trusts it (before TensorFlow)."""
    from heads.custom import check_head_trust
    from heads.run_folder import read_config

    record = read_config(run_dir).get("head_code")
    check_head_trust(run_dir, record, trusted=args.trust_head_code, named=args.head_code)


def _print_result(args, result: dict) -> None:
    """A result's text summary, or with --json everything else in it."""
    if args.json:
        _print_json({k: v for k, v in result.items() if k != "summary"})
    else:
        print(result["summary"])


def cmd_report(args, config: Config) -> None:
    from cxr14.outputs import check_output_file
    from heads.run_folder import find_reported

    if args.out:
        check_output_file(args.out, what="--out")

    runs = [_run_or_sweep(run, runs_dir=config.runs_dir) for run in args.runs] or find_reported(
        config.runs_dir
    )
    if not runs:  # answered before numpy and the index load
        raise InputError(
            f"no runs to report under {config.runs_dir}: train one with run.py train-head, or name run folders"
        )
    from experiments.data import open_config_dataset
    from experiments.leaderboard import leaderboard

    text = leaderboard(runs, split=args.split, index=open_config_dataset(config).index)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    print(text)


def _run_or_sweep(run: str, *, runs_dir: Path) -> Path:
    """A run folder (find_run), or a sweep folder: one holding the grid.toml a sweep copies in."""
    from heads.run_folder import find_run

    for candidate in (Path(run), runs_dir / run):
        if (candidate / "grid.toml").is_file():
            return candidate
    return find_run(run, runs_dir=runs_dir)


def cmd_compare(args, config: Config) -> None:
    from experiments.compare import run_compare
    from heads.run_folder import find_run

    runs = [find_run(run, runs_dir=config.runs_dir) for run in args.runs]
    result = run_compare(
        config,
        run_dirs=runs,
        split=args.split,
        out=args.out,
        n_boot=args.bootstrap if args.bootstrap is not None else config.train.bootstrap,
        seed=args.seed,
    )
    _print_result(args, result)


def cmd_sweep(args, config: Config) -> None:
    from experiments.sweep import MAX_TRIALS, check_grid_size, read_grid
    from heads.run_folder import run_path

    most = args.max_trials or MAX_TRIALS
    # A bad grid file, a grid too large or a bad name answers before TensorFlow loads.
    check_grid_size(read_grid(args.grid)[0], most=most, path=args.grid)
    run_path(config.runs_dir, args.name)
    _check_tensorboard(args)
    config = dataclasses.replace(config, train=override(config.train, **_flags(args, ("tensorboard",))))
    _tensorflow(args)
    from experiments.sweep import run_sweep

    with _results_only_on_stdout(args):
        result = run_sweep(config, grid_path=args.grid, name=args.name, max_trials=most)
    _print_result(args, result)


def cmd_curve(args, config: Config) -> None:
    from experiments.curve import curve_sizes, plan_lines

    sizes = curve_sizes(fractions=args.fractions, images=args.images)
    changes = _flags(args, TRAIN_FIELDS)
    backbone_sets = args.backbone or []
    plan_lines(config, heads=args.head, backbone_sets=backbone_sets, changes=changes)  # answers at once
    _tensorflow(args)
    from experiments.curve import run_curve

    name = args.name or "curve-" + "-".join(args.head) + "-" + "-".join(
        b.replace(",", "+") for b in backbone_sets
    )
    with _results_only_on_stdout(args):
        result = run_curve(
            config,
            heads=args.head,
            backbone_sets=backbone_sets,
            sizes=sizes,
            seeds=args.seeds,
            name=name,
            changes=changes,
        )
    if args.json:
        _print_json({k: v for k, v in result.items() if k != "summary_text"})
    else:
        print(result["summary_text"])


def _warn(text: str) -> None:
    """One warning line on stderr, so that --json output on stdout stays one JSON document."""
    if text:
        print(f"warning: {text}", file=sys.stderr)


def cmd_predict(args, config: Config) -> int:
    from cxr14.outputs import check_output_file
    from heads.run_folder import find_run

    if args.csv is not None:
        check_output_file(args.csv, what="--csv")  # before any prediction is made
    run_dir = find_run(args.run, runs_dir=config.runs_dir)
    _check_head_trust(args, run_dir)
    _tensorflow(args)
    from inference.predict import format_predictions, predict_images

    results = predict_images(
        run_dir=run_dir,
        inputs=args.images,
        extract=config.extract,
        heatmap_dir=args.heatmap,
        heatmap_top=args.heatmap_top,
        heatmap_method=args.heatmap_method,
    )
    # Once the run has loaded (a run that cannot load is one error line, nothing more).
    _warn(next((r["warning"] for r in results if r.get("warning")), ""))
    print(format_predictions(results, fmt="json" if args.json else "table", csv_path=args.csv))
    # Some unreadable files are reported in the output; only when none could be read is it a failure.
    return 1 if all(r.get("error") for r in results) else 0


def cmd_export(args, config: Config) -> None:
    from heads.run_folder import find_run

    run_dir = find_run(args.run, runs_dir=config.runs_dir)
    _check_head_trust(args, run_dir)
    _tensorflow(args)
    from inference.export import export_run
    from inference.trained import run_warning

    exported = export_run(run_dir=run_dir, out_dir=args.out)
    _warn(run_warning(run_dir))
    print(f"exported: {exported}")


def cmd_demo(args, config: Config) -> None:
    _tensorflow(args)
    from experiments.demo import run_demo

    print(run_demo(config, workdir=args.workdir, images=args.images))


def cmd_bench(args, config: Config) -> None:
    config = _check_bench_args(args, config)
    _tensorflow(args)
    if args.what == "curve":
        result, text = _bench_curve(args, config)
    elif args.what == "sweep":
        result, text = _bench_sweep(args, config)
    elif args.what == "tokens":
        result, text = _bench_tokens(args, config)
    elif args.what == "extract":
        from bench.extract import format_bench_extract, run_bench_extract

        result = run_bench_extract(
            config, backbones=args.backbone, images=args.images, from_pixels=args.from_pixels
        )
        text = format_bench_extract
    else:
        result, text = _bench_heads(args, config)
    if args.json:
        _print_json(result)
    else:
        print(text(result))


def _check_bench_args(args, config: Config) -> Config:
    """The bench's flags checked before TensorFlow loads; the config with bench extract's flags applied."""
    if args.what == "extract":
        config = _with_extract_flags(args, config)
        for name in (*args.backbone, *([args.from_pixels] if args.from_pixels else [])):
            config.backbone(name)
        _check_extract_inputs(args, config)
    elif args.what == "heads" and getattr(args, "head", None):
        from heads.custom import check_builder_file

        if not args.quality:
            raise InputError("bench heads --head needs --quality: a head of your own is measured for quality")
        for head in args.head:
            check_builder_file(head)
    if args.what == "heads" and getattr(args, "problems", ()) and not args.quality:
        raise InputError("bench heads --problems needs --quality: it picks the planted problems to train on")
    return config


def _bench_heads(args, config: Config):
    import tempfile

    from bench.heads import (
        bench_heads,
        bench_quality,
        format_bench_heads,
        format_quality,
        only_problems,
        with_heads,
    )

    with tempfile.TemporaryDirectory(prefix="cxr14-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        if args.quality:
            result = bench_quality(
                config=config,
                rows=args.rows,
                dim=args.dim,
                workdir=workdir,
                seed=args.seed,
                runs=only_problems(with_heads(args.head or ()), args.problems),
            )
            return result, format_quality
        result = bench_heads(
            rows=args.rows, dim=args.dim, workdir=workdir, fc=config.head("fc"), cnn=config.head("cnn")
        )
        return result, format_bench_heads


def _bench_curve(args, config: Config):
    import tempfile

    from bench.curve import bench_curve, format_bench_curve
    from experiments.curve import curve_sizes

    sizes = curve_sizes(fractions=args.fractions)
    with tempfile.TemporaryDirectory(prefix="cxr14-bench-") as tmp:
        with _results_only_on_stdout(args):
            result = bench_curve(
                config=config,
                heads=args.head,
                sizes=sizes,
                seeds=args.seeds,
                rows=args.rows,
                dim=args.dim,
                workdir=args.workdir or Path(tmp),
            )
    return result, format_bench_curve


def _bench_sweep(args, config: Config):
    import tempfile

    from bench.sweep import bench_sweep, format_bench_sweep

    with tempfile.TemporaryDirectory(prefix="cxr14-bench-") as tmp:
        with _results_only_on_stdout(args):
            result = bench_sweep(
                config=config,
                rows=args.rows,
                dim=args.dim,
                workdir=args.workdir or Path(tmp),
                alone=args.alone,
            )
    return result, format_bench_sweep


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions such as 0.01,0.1,1, got {text!r}") from None


def _counts(text: str) -> tuple[int, ...]:
    return tuple(_positive(x) for x in text.split(",") if x.strip())


def _head_kinds(text: str) -> tuple[str, ...]:
    kinds = _names(text)
    unknown = [k for k in kinds if k not in HEAD_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown head {unknown[0]!r}; valid: {', '.join(HEAD_KINDS)}")
    return kinds


def cmd_import_features(args, config: Config) -> None:
    from extract.imported import open_source, uses_tensorflow
    from extract.importing import ImportSettings, format_import, run_import_features

    settings = ImportSettings(
        name=args.name,
        tokens=args.tokens,
        dtype=args.dtype or config.extract.dtype,
        pretrained_on=args.pretrained_on,
        description=args.description,
    )
    source = open_source(
        args.source, layout=args.layout, key=args.key, names=args.names, id_column=args.id_column
    )
    if uses_tensorflow(args.source):
        _tensorflow(args)
    with _results_only_on_stdout(args):
        summary = run_import_features(config, source=source, settings=settings, force=args.force)
    if args.json:
        _print_json(dataclasses.asdict(summary))
    else:
        print(format_import(summary))


def cmd_bench_import(args, config: Config) -> None:
    from extract.import_bench import bench_import, format_bench_import

    result = bench_import(rows=args.rows, dim=args.dim, workdir=args.workdir)
    if args.json:
        _print_json(result)
    else:
        print(format_bench_import(result))


def _check_extract_inputs(args, config: Config) -> None:
    """The data folder and a --from-pixels cache, present before TensorFlow loads."""
    check_data(config)
    if args.from_pixels:
        cache_file(config.cache_dir, args.from_pixels)


def _with_extract_flags(args, config: Config) -> Config:
    names = ("batch_size", "views", "dtype", "mixed_precision", "xla")
    return dataclasses.replace(config, extract=override(config.extract, **_flags(args, names)))


def _flags(args, names) -> dict:
    """The flags among `names` that the user set (None: keep the config's value)."""
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def _head_option(text: str) -> tuple[str, object]:
    """KEY=VALUE, the value read as a TOML literal (64, 0.1, true, [1, 2], "text"); a bare word is a string."""
    import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a Python name, got {text!r}")
    try:
        return key.strip(), tomllib.loads(f"value = {value.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value.strip()


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like K/N (e.g. 0/4), got {text!r}") from None
    return k, n


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected NAME or NAME,NAME,... got {text!r}")
    return names


def _whole(text: str, *, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected a number of at least {low}, got {value}")
    return value


def _positive(text: str) -> int:
    return _whole(text, low=1)


def _seed(text: str) -> int:
    value = _whole(text, low=0)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"a seed is at most 2**32 - 1 = {SEED_MAX}, got {value}")
    return value


def _units(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--units must be comma-separated integers, got {text!r}") from None


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f'expected a whole number of at least 1 or "auto", got {text!r}'
        ) from None


class _HelpWithDefaults(argparse.HelpFormatter):
    """Help that shows a flag's default where it has a real one (not None, False, or said in the text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def _command(sub, name, func, help_text, *, folders=None):
    """A subcommand with --config, --verbose and the folder overrides it uses (COMMAND_FOLDERS)."""
    p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpWithDefaults)
    folders = COMMAND_FOLDERS[name] if folders is None else folders
    p.set_defaults(func=func, parser=p, folders=folders)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config file")
    p.add_argument(
        "--data-dir", type=Path, help=_folder_help("data set folder (default: data.dir)", "data", folders)
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        help=_folder_help("feature files folder (default: paths.cache_dir)", "cache", folders),
    )
    p.add_argument(
        "--runs-dir", type=Path, help=_folder_help("run folders (default: paths.runs_dir)", "runs", folders)
    )
    p.add_argument(
        "--verbose", action="store_true", help="show TensorFlow's own log lines (CUDA, oneDNN, XLA)"
    )
    return p


def _folder_help(text: str, folder: str, folders) -> str:
    return (
        text
        if folder in folders
        else "not used by this command (accepted, so one set of folder flags fits all)"
    )


def _json_flag(p, what: str = "print one JSON object instead of text") -> None:
    p.add_argument("--json", action="store_true", help=what)


def _trust_flags(p) -> None:
    p.add_argument(
        "--trust-head-code",
        action="store_true",
        help="a run whose head came from your own file runs that code (its copy in the run folder): allow it",
    )
    p.add_argument(
        "--head-code",
        type=Path,
        metavar="FILE",
        help="allow a run's head code when its copy is the same file as FILE (same sha256)",
    )


def _run_flag(p) -> None:
    p.add_argument("--run", required=True, help="a run: its name under the runs folder, or its folder")
    _trust_flags(p)


def _add_data_commands(sub) -> None:
    p = _command(
        sub, "index", cmd_index, "Print the data set at a glance (needs only the CSV and split lists)."
    )
    p.add_argument("--check-images", action="store_true", help="also count image files that are missing")
    _json_flag(p)
    p.add_argument("--write-splits", type=Path, metavar="DIR", help="write train/val/test lists to DIR")

    p = _command(
        sub, "make-sample", cmd_make_sample, "Write a small synthetic data set in the ChestX-ray14 layout."
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write it to")
    p.add_argument("--images", type=_positive, default=1000, help="how many images")
    p.add_argument("--size", type=_positive, default=256, help="image side in pixels (at least 32)")
    p.add_argument("--seed", type=_seed, default=0, help="seed for the drawn findings")
    _json_flag(p)


def _add_extract_commands(sub) -> None:
    p = _command(
        sub,
        "extract",
        cmd_extract,
        "Run frozen backbones over every image into <cache-dir>/NAME.h5, decoding each image once.",
    )
    p.add_argument(
        "--backbone",
        type=_names,
        required=True,
        help="NAME or NAME,NAME,... of [backbones.NAME] in the config: all in one pass, one file each",
    )
    p.add_argument(
        "--from-pixels",
        metavar="NAME",
        help='read the images from the pixel cache <cache-dir>/NAME.h5 (a source = "pixels" backbone) '
        "instead of decoding the PNGs",
    )
    _add_extract_flags(p)
    p.add_argument("--shard", type=_shard, default="0/1", metavar="K/N", help="take every N-th shard from K")
    p.add_argument("--limit", type=_positive, help="only the first N images of the index")
    p.add_argument(
        "--views",
        type=_positive,
        help="store K views per image (1 plain + K-1 augmented); default: extract.views",
    )
    p.add_argument("--dtype", choices=FEATURE_DTYPES, help="stored feature type (default: extract.dtype)")
    p.add_argument(
        "--force", action="store_true", help="discard shards/files made differently and start over"
    )
    _json_flag(p, "print the summary as one JSON object")

    p = _command(sub, "merge", cmd_merge, "Merge finished shards into <cache-dir>/NAME.h5.")
    p.add_argument("--backbone", required=True, help="the backbone whose shards to merge")


def _add_extract_flags(p) -> None:
    p.add_argument(
        "--batch-size", type=_positive, help="images per backbone call (default: extract.batch_size)"
    )
    p.add_argument("--mixed-precision", action="store_true", default=None, help="float16 compute (GPU)")
    p.add_argument("--xla", action="store_true", default=None, help="compile the backbone with XLA")


def _add_decision_flags(p) -> None:
    p.add_argument(
        "--calibration", choices=CALIBRATIONS, help="fitted on validation (default: decision.calibration)"
    )
    p.add_argument(
        "--operating-point",
        choices=OPERATING_POINTS,
        help="how each label's threshold is chosen on validation (default: decision.operating_point)",
    )
    p.add_argument(
        "--target", type=float, help="target sensitivity or specificity (default: decision.target)"
    )


def _add_training_flags(p) -> None:
    p.add_argument("--epochs", type=_positive, help="most epochs (default: train.epochs)")
    p.add_argument(
        "--batch-size",
        type=_batch_size,
        help='examples per step, or "auto": smaller for small training sets (default: train.batch_size)',
    )
    p.add_argument("--lr", type=float, help="learning rate (default: train.lr)")
    p.add_argument("--seed", type=_seed, help="seed for init, shuffling and dropout (default: train.seed)")
    p.add_argument("--loss", choices=LOSSES, help="loss (default: train.loss)")
    p.add_argument(
        "--start",
        choices=STARTS,
        help="feature heads: start as the ridge probe, or from random layers alone (default: train.start)",
    )
    p.add_argument(
        "--focal-gamma", type=float, help="focal loss: focusing exponent (default: train.focal_gamma)"
    )
    p.add_argument(
        "--patience",
        type=_positive,
        help="epochs without improvement before stopping (default: train.patience)",
    )
    p.add_argument(
        "--metadata",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add age, sex, view (default: train.metadata)",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train on cached views (default: train.augment)",
    )


def _add_head_flags(p) -> None:
    p.add_argument("--units", type=_units, help="FC layer sizes, e.g. 512,256 (default: the head's preset)")
    p.add_argument("--dropout", type=float, help="dropout rate (default: the head's preset)")
    p.add_argument(
        "--transition", type=_positive, help="ensemble, token heads: transition width (default: the preset)"
    )
    p.add_argument(
        "--fusion",
        choices=FUSIONS,
        help="ensemble, token heads on several maps: how branches join (default: the preset)",
    )
    p.add_argument(
        "--filters", type=_units, help="cnn: filters per conv block, e.g. 32,64,128 (default: the preset)"
    )
    p.add_argument("--l2", type=float, help="L2 weight penalty on the kernels (default: the preset)")


def _add_head_commands(sub) -> None:
    p = _command(sub, "train-head", cmd_train_head, "Train a head on cached features and evaluate it.")
    p.add_argument(
        "--head",
        required=True,
        metavar="HEAD",
        help=f"{', '.join(HEAD_KINDS)}, a [heads.NAME] table with a builder, or FILE.py:FUNCTION of your own",
    )
    p.add_argument(
        "--head-option",
        type=_head_option,
        action="append",
        metavar="KEY=VALUE",
        help="an option for a head from your own file (repeatable; VALUE is a TOML literal)",
    )
    p.add_argument(
        "--backbone", required=True, help="NAME, or NAME,NAME,... for the ensemble or a token head"
    )
    p.add_argument("--name", help="run folder name under runs/ (default: HEAD-BACKBONES)")
    _add_training_flags(p)
    _add_head_flags(p)
    _add_decision_flags(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    _tensorboard_flag(p)
    _json_flag(p, "print the metrics as one JSON object (progress goes to stderr)")

    p = _command(
        sub, "evaluate", cmd_evaluate, "Recompute metrics of a run from its saved model and the cache."
    )
    _run_flag(p)
    p.add_argument("--split", choices=("val", "test"), default="test", help="which split to score")
    p.add_argument(
        "--expert",
        nargs="?",
        const=True,
        type=Path,
        metavar="FILE",
        help="score against Google's expert labels (found in the data folder, or FILE) beside the NIH labels",
    )
    p.add_argument(
        "--localization",
        type=Path,
        metavar="BBOX_CSV",
        help="instead of AUCs: the pointing game of the run's heatmaps against boxes shaped like NIH's "
        "BBox_List_2017.csv, on the split's boxed images under the data folder",
    )
    _add_heatmap_method(p)
    _json_flag(p, "print the metrics as one JSON object")


def _add_result_commands(sub) -> None:
    """report, compare and sweep: what gathers and ranks runs."""
    p = _command(sub, "report", cmd_report, "Gather runs into one markdown leaderboard.")
    p.add_argument("runs", nargs="*", help="run names or folders (default: every run under the runs folder)")
    p.add_argument("--out", type=Path, help="also write the leaderboard to this file")
    p.add_argument(
        "--split", choices=("val", "test"), default="test", help="the split every run is ranked on"
    )

    p = _command(
        sub,
        "compare",
        cmd_compare,
        "Runs against the first named on the same images: per-disease AUC differences, intervals, p-values.",
    )
    p.add_argument("runs", nargs="+", help="two or more run names or folders; the first is the reference")
    p.add_argument("--split", choices=("val", "test"), default="test", help="whose predictions to compare")
    p.add_argument("--out", type=Path, help="folder for compare.md/.json/.png (default: runs/compare-A-vs-B)")
    p.add_argument(
        "--bootstrap", type=lambda t: _whole(t, low=0), help="patient resamples (default: train.bootstrap)"
    )
    p.add_argument("--seed", type=_seed, default=0, help="the seed that draws the patient resamples")
    _json_flag(p)

    p = _command(
        sub, "sweep", cmd_sweep, "Train every head combination in a grid; pick the best on validation."
    )
    p.add_argument("--grid", type=Path, required=True, help="the grid TOML (see docs/stage-two.md)")
    p.add_argument("--name", default="sweep", help="sweep folder name under runs/")
    p.add_argument(
        "--max-trials",
        type=_positive,
        help="refuse a grid of more combinations than this (default: 1000, a guard against a grid typed "
        "too large)",
    )
    _tensorboard_flag(p)
    _json_flag(p, "print the result as one JSON object (progress goes to stderr)")


def _check_tensorboard(args) -> None:
    """--tensorboard needs the tensorboard package (TensorFlow no longer brings it): said before training."""
    import importlib.util

    if getattr(args, "tensorboard", None) and importlib.util.find_spec("tensorboard") is None:
        raise InputError("--tensorboard needs the tensorboard package: pip install tensorboard")


def _tensorboard_flag(p) -> None:
    p.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="write each run's per-epoch scalars for TensorBoard to DIR/RUN (default: train.tensorboard)",
    )


def _add_curve_command(sub) -> None:
    p = _command(
        sub,
        "curve",
        cmd_curve,
        "A learning curve: heads trained on nested patient-wise subsets of the training split, scored on test.",
    )
    p.add_argument("--head", type=_head_kinds, required=True, help="KIND or KIND,KIND,...: one line each")
    p.add_argument(
        "--backbone",
        action="append",
        required=True,
        help="NAME (NAME,NAME for the ensemble); repeat for several backbone sets, one line each",
    )
    _add_curve_sizes(p)
    p.add_argument("--images", type=_counts, metavar="N,N,...", help="sizes as image counts instead")
    p.add_argument("--name", help="curve folder name under runs/ (default: curve-HEADS-BACKBONES)")
    _add_training_flags(p)
    _json_flag(p, "print the result as one JSON object (progress goes to stderr)")


def _add_curve_sizes(p) -> None:
    p.add_argument(
        "--fractions",
        type=_fractions,
        metavar="F,F,...",
        help="sizes as fractions of the training images (default: 0.01,0.03,0.1,0.3,1)",
    )
    p.add_argument(
        "--seeds",
        type=_positive,
        default=3,
        help="seeds per point, from train.seed up: each draws its patient order and its training",
    )


def _add_heatmap_method(p) -> None:
    p.add_argument(
        "--heatmap-method",
        choices=HEATMAP_METHODS,
        default="auto",
        help="auto: Grad-CAM where every backbone exposes its last conv feature map, else SmoothGrad",
    )


def _add_model_commands(sub) -> None:
    # predict and export read everything else from the run folder.
    p = _command(sub, "predict", cmd_predict, "Run a trained model on new PNG or DICOM images.")
    _run_flag(p)
    p.add_argument(
        "images", nargs="+", type=Path, metavar="IMAGE_OR_DIR", help="PNG/DICOM files or folders of them"
    )
    p.add_argument(
        "--heatmap",
        type=Path,
        metavar="DIR",
        help="also write per image an overlay PNG and .npy maps of the top findings into DIR",
    )
    p.add_argument(
        "--heatmap-top", type=_positive, default=3, metavar="N", help="findings per heatmap overlay"
    )
    _add_heatmap_method(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON document")
    out.add_argument("--csv", type=Path, metavar="FILE", help="write a CSV file instead of a table")

    p = _command(sub, "export", cmd_export, "Write one self-contained model: image in, 14 probabilities out.")
    _run_flag(p)
    p.add_argument("--out", type=Path, required=True, help="a new or empty folder for the SavedModel")

    p = _command(
        sub, "demo", cmd_demo, "Sample data -> two offline backbones -> fc and ensemble heads -> AUC table."
    )
    p.add_argument("--workdir", type=Path, default=Path("demo"), help="where the demo writes everything")
    p.add_argument("--images", type=_positive, default=None, help="sample size (default: the demo's own)")


def _add_import_command(sub) -> None:
    from extract.settings import IMPORT_LAYOUTS, TOKEN_POOLING

    p = _command(
        sub,
        "import-features",
        cmd_import_features,
        "Import embeddings made elsewhere (.npz, v1 .tfrecord/.npz per image, HDF5, .npy + names, parquet) "
        "into <cache-dir>/NAME.h5, matched to the index by image id.",
    )
    p.add_argument(
        "source", type=Path, metavar="SOURCE", help="the embedding file, or a folder of per-image files"
    )
    p.add_argument("--name", required=True, help="the backbone name to train with: --backbone NAME")
    p.add_argument(
        "--layout", choices=("auto", *IMPORT_LAYOUTS), default="auto", help="how SOURCE is laid out"
    )
    p.add_argument(
        "--key",
        default="",
        help="HDF5: the array inside each image's group (e.g. elixrc/Embedding); "
        "v1 files: the vector's key (default embedding)",
    )
    p.add_argument("--names", type=Path, help=".npy: CSV of the image id of each matrix row")
    p.add_argument(
        "--id-column", default="", help='names CSV / parquet: the id column (default "Image Index")'
    )
    p.add_argument(
        "--tokens", choices=TOKEN_POOLING, default="mean", help="rows of tokens: average them, or flatten"
    )
    p.add_argument("--dtype", choices=FEATURE_DTYPES, help="stored feature type (default: extract.dtype)")
    p.add_argument(
        "--pretrained-on",
        type=_names,
        default=(),
        metavar="SET,SET",
        help="what the model was pre-trained on, e.g. ChestX-ray14 (every result then says so)",
    )
    p.add_argument("--description", default="", help="where the embeddings came from (recorded in the file)")
    p.add_argument("--force", action="store_true", help="replace an existing <cache-dir>/NAME.h5")
    _json_flag(p)


def _bench_tokens(args, config: Config):
    import tempfile

    from bench.tokens import bench_tokens, format_bench_tokens

    with tempfile.TemporaryDirectory(prefix="cxr14-bench-") as tmp:
        result = bench_tokens(
            rows=args.rows,
            tokens=args.tokens,
            channels=args.channels,
            budget_gb=args.budget_gb,
            workdir=args.workdir or Path(tmp),
            head=config.head("attention"),
            memory=not args.streamed_only,
        )
    return result, format_bench_tokens


def _add_bench_tokens(what) -> None:
    p = _command(
        what,
        "tokens",
        cmd_bench,
        "Time an attention head streaming a token cache larger than its memory budget from disk, against "
        "reading the cache once; and its peak memory.",
        folders=(),
    )
    p.add_argument("--rows", type=_positive, default=112_120, help="images in the synthetic token cache")
    p.add_argument("--tokens", type=_positive, default=49, help="tokens per image (7 x 7)")
    p.add_argument("--channels", type=_positive, default=256, help="channels per token")
    p.add_argument(
        "--budget-gb", type=float, default=1.0, help="[train] token_memory_gb for the run (below the cache)"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="where to write the token cache (default: a temp dir); one already there from the same "
        "rows, tokens, channels and seed is kept",
    )
    p.add_argument(
        "--streamed-only", action="store_true", help="skip training it again with the cache loaded whole"
    )
    _json_flag(p)


def _add_bench_command(sub) -> None:
    help_text = "Measure extraction or head-training speed, or an import's memory."
    bench = sub.add_parser("bench", help=help_text, description=help_text)
    what = bench.add_subparsers(
        dest="what", required=True, metavar="{extract,heads,curve,sweep,import,tokens}"
    )
    _add_bench_extract(what)
    _add_bench_heads(what)
    _add_bench_curve(what)
    _add_bench_sweep(what)
    _add_bench_tokens(what)
    p = _command(
        what,
        "import",
        cmd_bench_import,
        "Peak memory of import-features on a full-size .npz keyed by image id (written to a temp dir).",
        folders=(),
    )
    p.add_argument("--rows", type=_positive, default=112_120, help="images in the .npz and the index")
    p.add_argument("--dim", type=_positive, default=1376, help="values per embedding (CXR Foundation v1)")
    p.add_argument("--workdir", type=Path, help="where to write the .npz and the cache (default: a temp dir)")
    _json_flag(p)


def _add_bench_extract(what) -> None:
    p = _command(
        what,
        "extract",
        cmd_bench,
        "Time decoding, the backbones and one whole extraction pass on the data's images.",
        folders=COMMAND_FOLDERS["bench"],
    )
    p.add_argument(
        "--backbone", type=_names, default="offline_cnn", help="backbone(s) to measure, NAME,NAME,..."
    )
    p.add_argument("--images", type=_positive, default=512, help="images to time")
    p.add_argument(
        "--from-pixels",
        metavar="NAME",
        help="also time the pass reading the pixel cache <cache-dir>/NAME.h5, against the PNGs",
    )
    _add_extract_flags(p)
    _json_flag(p)


def _add_bench_heads(what) -> None:
    p = _command(
        what,
        "heads",
        cmd_bench,
        "Time the fc and cnn heads against their compute floors on synthetic data (--quality: how well "
        "each head learns).",
        folders=(),
    )
    p.add_argument("--rows", type=_positive, default=112_120, help="rows of the synthetic feature cache")
    p.add_argument("--dim", type=_positive, default=2048, help="feature dimension")
    p.add_argument("--workdir", type=Path, help="where to write the synthetic cache (default: a temp dir)")
    p.add_argument(
        "--quality", action="store_true", help="each default head against the ridge probe on planted problems"
    )
    p.add_argument(
        "--seed", type=_seed, default=0, help="with --quality: the seed that draws the planted problems"
    )
    p.add_argument(
        "--head",
        action="append",
        metavar="FILE.py:FUNCTION",
        help="with --quality: also a head of your own on every planted problem (repeatable)",
    )
    p.add_argument(
        "--problems",
        type=lambda text: tuple(x.strip() for x in text.split(",") if x.strip()),
        default=(),
        metavar="NAMES",
        help="with --quality: only these planted problems, comma-separated (linear, nonlinear, "
        "complementary, metadata, local; default all)",
    )
    _json_flag(p)


def _add_bench_curve(what) -> None:
    p = _command(
        what,
        "curve",
        cmd_bench,
        "Time a learning curve (heads x fractions x seeds) on a planted cache of the full data set's size.",
        folders=(),
    )
    p.add_argument("--head", type=_head_kinds, default=("linear",), help="KIND or KIND,KIND,...")
    _add_curve_sizes(p)
    p.add_argument("--rows", type=_positive, default=112_120, help="rows of the planted feature cache")
    p.add_argument("--dim", type=_positive, default=2048, help="feature dimension")
    p.add_argument(
        "--workdir", type=Path, help="where to write the cache and the curve (default: a temp dir)"
    )
    _json_flag(p)


def _add_bench_sweep(what) -> None:
    p = _command(
        what,
        "sweep",
        cmd_bench,
        "Time a sweep of 8 fc trials (4 lr x 2 dropout) against one train-head fc on a planted cache of the "
        "full data set's size, each in a fresh process; and some trials trained alone beside them.",
        folders=(),
    )
    p.add_argument("--rows", type=_positive, default=112_120, help="rows of the planted feature cache")
    p.add_argument("--dim", type=_positive, default=2048, help="feature dimension")
    p.add_argument("--alone", type=int, default=2, help="trials trained again alone, to compare their AUCs")
    p.add_argument("--workdir", type=Path, help="where to write the cache and the runs (default: a temp dir)")
    _json_flag(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cxr14 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_data_commands,
        _add_extract_commands,
        _add_head_commands,
        _add_result_commands,
        _add_curve_command,
        _add_model_commands,
        _add_import_command,
        _add_bench_command,
    ):
        add(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extras = build_parser().parse_known_args(argv)
    if extras:
        _refuse_unknown(args, extras)
    args.argv = argv  # for suggested commands that repeat the user's own
    _note_unused_folders(args)
    try:
        config = load_config(args.config)
        config = dataclasses.replace(config, **_flags(args, ("data_dir", "cache_dir", "runs_dir")))
        return args.func(args, config) or 0
    except InputError as err:
        fix = f": {suggested_command(err.fix, args)}" if err.fix else ""
        print(f"error: {err}{fix}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # before OSError, its base class, whose clause would re-raise it
        # The reader (e.g. `| head`) went away; nothing is wrong with the data.
        sys.stderr.close()
        return 0
    except OSError as err:
        # Work already finished was written whole (shards, runs); the rerun resumes from it.
        print(f"error: {_os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    except SystemError as err:
        # Ctrl-C inside TensorFlow's C++ code can surface as "<built-in function ...> returned a result
        # with an exception set", the KeyboardInterrupt its context; it is the same interruption.
        if not _caused_by_interrupt(err):
            raise
        return _interrupted()


def _interrupted() -> int:
    print("interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr)
    return 130


def _caused_by_interrupt(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _os_error_line(err: OSError) -> str:
    """One line for any OSError: what went wrong and the path it names (e.g. "is a directory: out.csv")."""
    reason = os.strerror(err.errno).lower() if err.errno else str(err)
    where = ": ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
    return f"{reason}: {where}" if where else reason


if __name__ == "__main__":
    sys.exit(main())
