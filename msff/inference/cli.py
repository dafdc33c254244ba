"""``msff predict``: whole-scene landslide mapping from GeoTIFFs.

``msff.cli`` adds this subcommand with :func:`add_predict_parser` and runs it with
:func:`run_predict`; ``python -m msff.inference.cli ...`` runs it stand-alone.

Examples::

    msff predict ckpt/ scene.tif --out out/                      # out/scene_prob.tif, _mask.tif
    msff predict ckpt/ --bands B4.tif B3.tif B2.tif --out out/iburi \\
        --vector gpkg --min-area 500 --quicklook --tta
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["add_predict_parser", "run_predict", "build_parser", "main", "output_paths"]

DESCRIPTION = """Map landslides over whole scenes of any size with a trained checkpoint.

Each INPUT raster is one scene (all its bands, in order); --bands stacks single-band files of one
scene (e.g. Sentinel-2 B4 B3 B2). The scene is predicted in overlapping windows blended with
cosine weights (no seams) while reading and writing in blocks (memory ~ tile x width). Outputs are
Cloud-Optimized GeoTIFFs on the input grid: PREFIX_prob.tif (float32 probability in [0, 1], NaN
nodata; or uint8 round(p*250) with --prob-dtype uint8) and PREFIX_mask.tif (uint8: 1 landslide,
0 background, 255 nodata); optionally polygons (--vector) and a PNG quick-look (--quicklook).
"""


def add_predict_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``predict`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "predict",
        help="whole-scene prediction from GeoTIFFs (seamless tiling, COG outputs, polygons)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT",
        help="checkpoint folder (config.json + model.pt, from MSFFNet.save_pretrained) or a run folder with best/",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="raster file(s); each is one scene")
    p.add_argument(
        "--bands", nargs="+", metavar="FILE",
        help="one scene stacked from single-band files on the same grid, in the model's band order",
    )
    p.add_argument(
        "--resampling", default=None, metavar="M[,M...]",
        help="files on another grid than the first are reprojected onto it on the fly: bilinear (default; "
        "continuous values) or nearest (classes), one for all or one per file",
    )
    p.add_argument(
        "--date", nargs="+", action="append", default=None, metavar=("NAME", "FILE"),
        help="one date of a multi-date scene: its name and band files (repeat per date, e.g. --date pre "
        "pre/B4.tif pre/B3.tif pre/B2.tif --date post post/B4.tif ...); stacked in the model card's date order",
    )
    p.add_argument(
        "--reorder-dates", action="store_true",
        help="put --date groups given in another order than the model card's into the card's order (else refused)",
    )
    p.add_argument("--dem", default=None, metavar="FILE", help="DEM raster for terrain bands (any grid/CRS)")
    p.add_argument(
        "--terrain", default=None, metavar="NAMES",
        help="terrain bands computed from --dem and appended after the image bands, e.g. slope,hillshade "
        "(default: those in the model card)",
    )
    p.add_argument(
        "--band-indexes", default=None, metavar="I,J,K",
        help="1-based bands of the input (or of the --bands stack) to use, in order, e.g. 4,3,2",
    )
    p.add_argument(
        "--out", default=None,
        help="output prefix (out/iburi -> out/iburi_prob.tif, ...) or folder (existing, or ending "
        "with /: FOLDER/<input name>_prob.tif); default: the current folder",
    )
    p.add_argument("--threshold", type=float, default=None, help="mask threshold (default: checkpoint's, else 0.5)")
    p.add_argument("--nodata", type=float, default=None, help="input nodata value (default: from the files / their masks)")
    p.add_argument("--tile", type=int, default=512, help="window size in pixels (default 512)")
    p.add_argument("--overlap", type=int, default=128, help="overlap of neighbouring windows in pixels (default 128)")
    p.add_argument(
        "--margin", type=int, default=None,
        help="zero-weight pixels at inner window edges (default overlap/4)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation (4 passes)")
    p.add_argument(
        "--vector", default=None, metavar="PATH|gpkg|geojson",
        help="write landslide polygons: a .gpkg/.geojson path (one scene), or just the format to "
        "write PREFIX_polygons.<ext> beside the rasters",
    )
    p.add_argument("--min-area", type=float, default=0.0, help="drop polygons smaller than this many m² (default 0)")
    p.add_argument("--prob-dtype", choices=("float32", "uint8"), default="float32", help="probability raster encoding")
    p.add_argument("--quicklook", action="store_true", help="also write PREFIX_quicklook.png (mask over the scene)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--scene-list", default=None, metavar="FILE",
        help="text file naming one raster (scene) per line, added to INPUT (INPUT may also be a quoted glob, 'tiles/*.tif')",
    )
    p.add_argument(
        "--resume", action="store_true",
        help="skip scenes whose outputs are complete and valid (PREFIX_run.json written last, same checkpoint, "
        "outputs of the scene's size); predict incomplete ones again",
    )
    p.add_argument(
        "--summary", default=None, metavar="CSV",
        help="summary table of a multi-scene run (default OUT/summary.csv); failed scenes are recorded there and "
        "the run goes on (exit status 1 at the end)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16 where supported, else fp16)")
    p.add_argument(
        "--backend", default=None, choices=("auto", "reference", "triton", "cuda"),
        help="MSFFNet kernel backend (default: the checkpoint's / MSFF_BACKEND)",
    )
    p.add_argument(
        "--engine", default="auto", choices=("auto", "onnx", "torch", "nchw"),
        help="how the network runs: auto (default: onnxruntime on CPU when msff[onnx] is installed, "
        "else channels_last torch; NCHW torch on GPU), onnx, torch (channels_last on CPU), nchw",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("input domain (is this scene like the training data?)")
    g.add_argument(
        "--input-scale", default=None, metavar="SPEC",
        help="override the checkpoint's input scale: none, divide:C (e.g. divide:10000), or "
        "percentile[:LO,HI[:MAX]] (per-band stretch of this scene, default 2,98 to 0..255; for a scene "
        "from another sensor than the training data)",
    )
    g.add_argument(
        "--strict", action="store_true",
        help="refuse (exit 2, nothing written) a scene whose sampled band statistics are far from the training data's",
    )
    g.add_argument("--no-domain-check", action="store_true", help="skip the input domain check")


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with the ``predict`` options (for ``python -m msff.inference.cli``)."""
    p = argparse.ArgumentParser(prog="msff predict", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return p


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


def _parse_indexes(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--band-indexes {text!r}: expected comma-separated band numbers, e.g. 4,3,2") from None


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
        plans = _plan(args)
        check_min_area(args.min_area)
        for pl in plans if not args.resume else ():
            check_outputs([pl["prob"], pl["mask"], pl["vector"], pl["quicklook"], pl["report"]], overwrite=args.overwrite)
        if args.tile < 1 or not 0 <= args.overlap < args.tile:
            raise ValueError(f"need --tile >= 1 and 0 <= --overlap < --tile (got {args.tile}, {args.overlap})")
        if args.vector and Path(plans[0]["vector"]).suffix.lower() == ".gpkg":
            try:
                import pyogrio  # noqa: F401
            except ImportError:
                raise InferenceError("--vector .gpkg needs the optional package pyogrio (pip install pyogrio); use geojson instead") from None
        band_indexes = _parse_indexes(args.band_indexes)
        ctx = distributed.init(args.device)
        device = ctx.device or resolve_device(args.device)
        pred = load_predictor(args.checkpoint, device=device, backend=args.backend)
        tile_warning = check_tile(pred.model, args.tile)  # refuses a tile below the downsampling factor
        if tile_warning:
            _say(f"warning: {tile_warning}")
        if args.threshold is not None:
            if not 0.0 <= args.threshold <= 1.0:
                raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
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
                    terrain=None if args.terrain is None else [t for t in args.terrain.split(",") if t.strip()],
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
    """Entry point of ``python -m msff.inference.cli``."""
    return run_predict(build_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

