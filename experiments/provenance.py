"""Which backbone made each cache: checked against the config before a head trains on it, recorded in
the run as extracted (what predict and export rebuild), and checked again before a run is evaluated."""

import dataclasses
from pathlib import Path

from cache.paths import cache_path
from cxr14.caveats import SYNTHETIC_NOTICE
from cxr14.errors import Fix, InputError
from cxr14.made_by import made_by
from experiments.config import Config
from extract.settings import PROJECTION_KEYS, BackboneConfig

# Cache attributes a run records; evaluate refuses a cache whose recorded ones changed since.
RECORDED = ("backbone", "kind", "dtype", "views", "fingerprint", "image_list_sha256")
# The settings extraction records (BackboneConfig.as_dict): what the weights saw is not among them.
BACKBONE_FIELDS = {f.name: f for f in dataclasses.fields(BackboneConfig) if f.name != "pretrained_on"}
# The code's own folder, whose git commit every run records.
SOURCE_DIR = Path(__file__).resolve().parents[1]


def check_made_by(config: Config, caches: dict[str, dict]) -> None:
    """Refuse a cache (per backbone, its attributes as read) made by another backbone or with other
    settings than the config's table for it."""
    for name, attrs in caches.items():
        check_cache(
            cache_path(config.cache_dir, name), name=name, attrs=attrs, configured=config.backbones.get(name)
        )


def check_cache(path: Path, *, name: str, attrs: dict, configured: BackboneConfig | None) -> None:
    """Refuse a cache that is not backbone `name`'s as `configured` (None: no table, features of one's
    own or a table since removed; the cache then describes itself)."""
    if attrs["backbone"] != name:
        raise InputError(
            f"{path} holds features of backbone {attrs['backbone']!r} (its 'backbone' attribute), not "
            f"{name!r}: a renamed file? Name it {attrs['backbone']}.h5, or make {name}'s"
        ).fixed_by(Fix("extract", {"backbone": name, "force": True}))
    if configured is None:
        return
    extracted = extracted_backbone(attrs)
    if extracted is None:
        raise InputError(
            f"{path} records no backbone settings (no backbone_config: features made outside run.py "
            f"extract), so they cannot be checked against [backbones.{name}]; remove that table to train "
            "on them as features of your own, or re-extract them"
        ).fixed_by(Fix("extract", {"backbone": name, "force": True}))
    wanted = configured.as_dict()
    differ = [key for key in wanted if extracted.get(key) != wanted[key]]
    if differ:
        shown = "; ".join(
            f"{key} {extracted.get(key)!r} in the cache, {wanted[key]!r} in the config" for key in differ
        )
        raise InputError(
            f"{path} was extracted with other [backbones.{name}] settings than the config's ({shown}); "
            "set them back, or re-extract it"
        ).fixed_by(Fix("extract", {"backbone": name, "force": True}))


def extracted_backbone(attrs: dict) -> dict | None:
    """The backbone's settings the cache was extracted with (the [backbones] table's keys; defaults for
    keys it predates), or None for features made elsewhere, which record none."""
    stored = attrs.get("backbone_config")
    if not isinstance(stored, dict):
        return None
    defaults = {key: f.default for key, f in BACKBONE_FIELDS.items() if f.default is not dataclasses.MISSING}
    settings = {**defaults, **{key: value for key, value in stored.items() if key in BACKBONE_FIELDS}}
    if settings.get("output") == "pooled":  # as BackboneConfig.as_dict leaves it out, for old fingerprints
        del settings["output"]
    if not settings.get("map_channels"):  # likewise the projection's keys where there is none
        for key in PROJECTION_KEYS:
            settings.pop(key, None)
    return settings


def recorded(caches: dict[str, dict]) -> dict[str, dict]:
    """What a run records of each cache it trained on."""
    return {name: {key: attrs.get(key) for key in RECORDED} for name, attrs in caches.items()}


def snapshot(config: Config, plan, *, caches: dict[str, dict], synthetic: bool = False) -> dict:
    """The resolved config saved as runs/RUN/config.json: enough to evaluate, predict and export later.

    `plan`: the run's RunPlan (experiments/experiment.py). The backbones are recorded as their caches were extracted (None for features of one's own), so a
    later edit of the config cannot change what predict and export run. `synthetic`: trained on a
    make-sample data set (predict and export then warn).
    """
    return {
        "head": dataclasses.asdict(plan.head),
        "train": dataclasses.asdict(plan.train),
        "decision": dataclasses.asdict(config.decision),
        "backbones": {name: extracted_backbone(caches[name]) for name in plan.backbones},
        "labels": list(config.labels),
        "data": {"synthetic": synthetic, **({"notice": SYNTHETIC_NOTICE} if synthetic else {})},
        # Prediction must round features exactly as the cache did, so record how it stored them.
        "feature_dtypes": {name: caches[name]["dtype"] for name in plan.backbones},
        "caches": recorded({name: caches[name] for name in plan.backbones}),
        "config": config.as_dict(),
        "made_by": made_by(source_dir=SOURCE_DIR),
    }


def check_unchanged(run_dir: Path, *, saved: dict, caches: dict[str, dict], cache_dir: Path) -> None:
    """Refuse caches changed since the run was trained (re-extracted differently, replaced)."""
    for name, then in (saved.get("caches") or {}).items():
        now = recorded({name: caches[name]})[name] if name in caches else {}
        differ = [key for key, value in then.items() if value is not None and now.get(key) != value]
        if differ:
            raise InputError(
                f"{cache_path(cache_dir, name)} changed since {run_dir} was trained on it "
                f"({', '.join(differ)} differ); train the run again on the cache as it is now"
            )
