"""``msff predict``: whole-scene landslide mapping from GeoTIFFs.

The options are the fields of :class:`msff.config.PredictConfig` (the command line, config files
and ``--print_config`` come from :mod:`msff.cli`); :func:`run_predict` runs one config;
``python -m msff.inference.cli ...`` runs it stand-alone.

Examples::

    msff predict ckpt/ scene.tif --out out/                      # out/scene_prob.tif, _mask.tif
    msff predict ckpt/ --bands B4.tif B3.tif B2.tif --out out/iburi \\
        --vector gpkg --min-area 500 --quicklook --tta
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

from msff.config import PredictConfig

__all__ = ["add_predict_parser", "run_predict", "build_parser", "main", "output_paths", "as_predict_config"]

DESCRIPTION = """Map landslides over whole scenes of any size with a trained checkpoint.

Each INPUT raster is one scene (all its bands, in order); --bands stacks single-band files of one
scene (e.g. Sentinel-2 B4 B3 B2). The scene is predicted in overlapping windows blended with
cosine weights (no seams) while reading and writing in blocks (memory ~ tile x width). Outputs are
Cloud-Optimized GeoTIFFs on the input grid: PREFIX_prob.tif (float32 probability in [0, 1], NaN
nodata; or uint8 round(p*250) with --prob-dtype uint8) and PREFIX_mask.tif (uint8: 1 landslide,
0 background, 255 nodata); optionally polygons (--vector) and a PNG quick-look (--quicklook).
"""


def add_predict_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``predict`` to an ``argparse`` subparsers object (a CLI embedding it); its arguments are
    parsed into a :class:`~msff.config.PredictConfig` by :func:`run_predict`."""
    p = subparsers.add_parser("predict", help="whole-scene prediction from GeoTIFFs (seamless tiling, COG "
                              "outputs, polygons)", description=DESCRIPTION, add_help=False, prefix_chars="\0")
    p.add_argument("predict_argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=run_predict)
    return p


def build_parser():
    """The ``msff predict`` parser, generated from :class:`msff.config.PredictConfig` (jsonargparse)."""
    from msff.cli import DESCRIPTION as COMMAND_DESCRIPTIONS
    from msff.cli import build_command_parser

    COMMAND_DESCRIPTIONS.setdefault("predict", DESCRIPTION)
    return build_command_parser("predict", prog="msff predict")


def as_predict_config(args) -> Optional[PredictConfig]:
    """A :class:`PredictConfig` from itself, from ``add_predict_parser``'s arguments, or from a
    namespace with its fields (None after ``--print_config``)."""
    if isinstance(args, PredictConfig):
        return args
    if hasattr(args, "predict_argv"):
        from msff.cli import parse_command

        configs = parse_command("predict", args.predict_argv, prog="msff predict")
        return None if configs is None else configs[PredictConfig]
    names = [f.name for f in dataclasses.fields(PredictConfig)]
    return PredictConfig(**{k: getattr(args, k) for k in names if hasattr(args, k)})


def _scene_stem(paths: Sequence[str]) -> str:
    stems = [Path(p).stem for p in paths]
    if len(stems) == 1:
        return stems[0]
    common = os.path.commonprefix(stems)
    if any(len(s) > len(common) and s[len(common) - 1 : len(common) + 1].isalnum() for s in stems):
        # cut back to a word boundary: download.B4/download.B3 -> "download", not "download.B"
        common = re.sub(r"[^._\- ]*$", "", common)
    return common.rstrip("._- ") or stems[0]


def output_paths(out: Optional[str], stem: str, many: bool) -> str:
    """The output prefix for one scene: ``<dir>/<stem>`` or the given prefix."""
    if out is None:
        return stem
    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        return str(Path(out) / stem)
    if many:
        raise ValueError(f"--out {out!r} is a prefix, but several scenes are given: pass a folder (end it with /)")
    return out


def _plan(args) -> list[dict]:
    scenes = []
    if args.bands:
        scenes.append([str(b) for b in args.bands])
    dates = _dates(getattr(args, "date", None))
    if dates:
        scenes.append([f for _, files in dates for f in files])
    from msff.inference.batch import expand_inputs

    scenes.extend([[str(i)] for i in expand_inputs(args.inputs, getattr(args, "scene_list", None))])
    if not scenes:
        raise ValueError("no input: give INPUT raster(s) and/or --bands FILE ...")
    stems = [_scene_stem(s) for s in scenes]
    if len(set(stems)) != len(stems):
        raise ValueError(f"several scenes would share an output name ({stems}); run them separately")
    plans = []
    vec = args.vector
    vec_fmt = vec.lower().lstrip(".") if vec and vec.lower().lstrip(".") in ("gpkg", "geojson") else None
    if vec and vec_fmt is None:
        if len(scenes) > 1:
            raise ValueError("--vector PATH with several scenes: give just the format (gpkg or geojson)")
        if Path(vec).suffix.lower() not in (".gpkg", ".geojson", ".json"):
            raise ValueError(f"--vector {vec!r}: use a .gpkg or .geojson path, or 'gpkg' / 'geojson'")
    for files, stem in zip(scenes, stems, strict=True):
        prefix = output_paths(args.out, stem, len(scenes) > 1)
        plans.append(
            dict(
                dates=dates if dates and files == [f for _, fs in dates for f in fs] else None,
                files=files,
                prob=f"{prefix}_prob.tif",
                mask=f"{prefix}_mask.tif",
                vector=(f"{prefix}_polygons.{vec_fmt}" if vec_fmt else vec) if vec else None,
                quicklook=f"{prefix}_quicklook.png" if args.quicklook else None,
                report=f"{prefix}_run.json",
            )
        )
    return plans


def _summary_path(out: Optional[str]) -> str:
    if out is None:
        return "summary.csv"
    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        return str(Path(out) / "summary.csv")
    return f"{out}_summary.csv"


def _dates(groups) -> list:
    """``--date NAME FILE...`` groups as ``[(name, [files])]``."""
    out = []
    for g in groups or []:
        if len(g) < 2:
            raise ValueError(f"--date {' '.join(g)}: give a name and at least one band file")
        if g[0] in [n for n, _ in out]:
            raise ValueError(f"--date {g[0]!r} given twice")
        out.append((g[0], [str(f) for f in g[1:]]))
    return out


def _resampling(text: Optional[str], n: int):
    if text is None:
        return None
    names = [t.strip() or None for t in text.split(",")]
    if len(names) == 1:
        return names * n
    if len(names) != n:
        raise ValueError(f"--resampling {text!r}: give one method, or one per input file ({n})")
    return names


def _say(msg: str) -> None:
    print(f"msff predict: {msg}", file=sys.stderr)


def _print_domain(r) -> None:
    """One line: the input scale used and the domain check's verdict with its largest deviation."""
    from msff.data.scaling import InputScale

    if "input_scale" not in r.extra:
        return
    line = f"  input scale: {InputScale.from_dict(r.extra['input_scale']).describe()}"
    dom = r.extra.get("domain")
    if dom:
        zs = [abs(b["z"]) for b in dom["bands"] if b.get("z") is not None]
        worst = f" (largest band mean deviation {max(zs):.1f} training std)" if zs else ""
        line += f"; input domain check: {'ok' if dom['ok'] else 'FAR FROM TRAINING DATA, see the warning'}{worst}"
    print(line)


def _write_report(pl: dict, r, args) -> None:
    """The run's JSON sidecar: inputs, outputs, counts, input scale and the domain check numbers."""
    from msff.engine.report import atomic_write_json

    doc = {
        "checkpoint": str(args.checkpoint), "inputs": pl["files"],
        "outputs": {k: pl[k] for k in ("prob", "mask", "vector", "quicklook") if pl[k]},
        "width": r.width, "height": r.height, "crs": r.crs, "valid_pixels": r.valid_pixels,
        "landslide_pixels": r.landslide_pixels, "threshold": r.threshold, "tiles": r.tiles,
        "tiles_skipped": r.tiles_skipped, "seconds": r.seconds,
        "dates": pl.get("date_names"),
        **{k: r.extra[k] for k in ("landslide_fraction", "input_scale", "domain", "fraction_warning", "stack") if k in r.extra},
    }
    atomic_write_json(Path(pl["report"]), doc)


def run_predict(args) -> int:
    """Run ``msff predict`` for parsed ``args``. Returns the exit status (0 ok, 2 bad input/output,
    1 other failure); errors are printed as one line, never a traceback."""
    from msff.backend import BackendUnavailableError
    from msff.cli import UsageError
    from msff.inference import distributed
    from msff.inference.engine import EngineError
    from msff.inference.limits import check_min_area, check_tile
    from msff.inference.predict import predict_scene, resolve_device
    from msff.inference.predictor import load_predictor
    from msff.inference.quicklook import quicklook
    from msff.inference.sources import InferenceError
    from msff.inference.vector import polygonize_mask
    from msff.inference.writers import check_outputs

    try:
        args = as_predict_config(args)
    except (UsageError, ValueError) as e:
        _say(f"error: {e}")
        return 2
    if args is None:  # --print_config
        return 0
    try:
        plans = _plan(args)
        check_min_area(args.min_area)
        for pl in plans if not args.resume else ():
            check_outputs([pl["prob"], pl["mask"], pl["vector"], pl["quicklook"], pl["report"]], overwrite=args.overwrite)
        if args.vector and Path(plans[0]["vector"]).suffix.lower() == ".gpkg":
            try:
                import pyogrio  # noqa: F401
            except ImportError:
                raise InferenceError("--vector .gpkg needs the optional package pyogrio (pip install pyogrio); use geojson instead") from None
        band_indexes = args.band_indexes
        ctx = distributed.init(args.device)
        device = ctx.device or resolve_device(args.device)
        pred = load_predictor(args.checkpoint, device=device, backend=args.backend)
        tile_warning = check_tile(pred.model, args.tile)  # refuses a tile below the downsampling factor
        if tile_warning:
            _say(f"warning: {tile_warning}")
        if args.threshold is not None:  # in [0, 1]: checked by PredictConfig
            pred.threshold = args.threshold
        for pl in plans:
            if pl.get("dates"):
                from msff.inference.predict import order_dates

                pl["files"], pl["date_names"] = order_dates(pred, pl["dates"], args.reorder_dates)
        sharded = len(plans) == 1 and ctx.world > 1  # one scene: its window rows are split across ranks
        predict_fn = partial(distributed.predict_scene_sharded, ctx=ctx) if sharded else predict_scene

        def one(pl: dict, replace: bool):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                r = predict_fn(
                    pred,
                    pl["files"],
                    pl["prob"],
                    pl["mask"],
                    tile=args.tile,
                    overlap=args.overlap,
                    margin=args.margin,
                    batch_size=args.batch_size,
                    tta=args.tta,
                    nodata=args.nodata,
                    band_indexes=band_indexes,
                    device=device,
                    amp=args.amp,
                    backend=args.backend,
                    prob_dtype=args.prob_dtype,
                    overwrite=replace,
                    progress=not args.quiet,
                    input_scale=args.input_scale,
                    resampling=_resampling(args.resampling, len(pl["files"])),
                    dem=args.dem,
                    terrain=args.terrain,
                    domain_check="off" if args.no_domain_check else ("strict" if args.strict else "warn"),
                    engine=args.engine,
                )
            texts = [str(w.message) for w in caught
                     if not issubclass(w.category, (PendingDeprecationWarning, DeprecationWarning))]
            if sharded and ctx.rank != 0:  # rank 0 reports and writes the vector / quick-look / sidecar
                return r, texts
            for t in texts:
                _say(f"warning: {t}")
            frac = r.landslide_pixels / max(r.valid_pixels, 1)
            print(
                f"{' + '.join(pl['files'])}: {r.width}x{r.height} px ({r.crs or 'no CRS'}), "
                f"{r.valid_pixels} valid, {r.landslide_pixels} landslide ({100 * frac:.2f} %), "
                f"{r.tiles} tiles ({r.tiles_skipped} nodata skipped), {r.seconds:.1f} s, "
                f"{r.megapixels_per_second:.2f} MP/s"
            )
            _print_domain(r)
            print(f"  wrote {r.prob}\n  wrote {r.mask}")
            if pl["vector"]:
                polys = polygonize_mask(r.mask, r.prob, pl["vector"], min_area=args.min_area, overwrite=replace)
                unit = "m²" if r.georeferenced else "px"
                print(f"  wrote {pl['vector']} ({len(polys)} polygons, min area {args.min_area:g} {unit})")
            if pl["quicklook"]:
                quicklook(  # a multi-date scene is shown at its last date (post-event)
                    dict(pl["dates"])[pl["date_names"][-1]] if pl.get("dates") else pl["files"], r.mask,
                    pl["quicklook"], overwrite=replace, nodata=args.nodata, band_indexes=band_indexes,
                )
                print(f"  wrote {pl['quicklook']}")
            _write_report(pl, r, args)
            print(f"  wrote {pl['report']}")
            return r, texts

        if len(plans) == 1 and not (args.resume or args.summary) or sharded:
            one(plans[0], args.overwrite)
            return 0
        from msff.inference.batch import run_scenes

        return run_scenes(
            plans, one, checkpoint=str(args.checkpoint), resume=args.resume, overwrite=args.overwrite,
            summary=args.summary or _summary_path(args.out), say=_say, rank=ctx.rank, world=ctx.world,
            gather=ctx.gather,
        )
    except (InferenceError, ValueError, FileNotFoundError, BackendUnavailableError, EngineError) as e:
        _say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted; no partial output was kept")
        return 130
    except Exception as e:  # one line for the user; the full trace with MSFF_DEBUG=1
        if os.environ.get("MSFF_DEBUG"):
            raise
        _say(f"error: {type(e).__name__}: {e} (set MSFF_DEBUG=1 for the traceback)")
        return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m msff.inference.cli`` (the arguments of ``msff predict``)."""
    return run_predict(argparse.Namespace(predict_argv=list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

