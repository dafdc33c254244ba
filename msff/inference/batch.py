"""Many scenes in one ``msff predict`` run: input expansion, resume, per-scene failures, summary.

* Scenes come from INPUT files, glob patterns (``'tiles/*.tif'``, quoted so the shell leaves them)
  and ``--scene-list FILE`` (one raster per line; blank lines and ``#`` comments ignored).
* ``--resume`` skips a scene whose outputs are complete and valid: its ``PREFIX_run.json`` (written
  last) exists, names the same checkpoint, and every output it lists opens with the scene's size.
  A scene with some outputs but no valid sidecar (an interrupted run) is predicted again and its
  partial outputs replaced; outputs made with another checkpoint are an error for that scene.
* A failing scene is recorded and the run goes on; the exit status is 1 when any scene failed.
* A summary table (scene, status, size, valid pixels, landslide pixels and area, seconds,
  warnings, error) is printed and written as CSV.
* Under ``torchrun`` scenes are dealt round-robin to the ranks (:mod:`msff.inference.distributed`);
  rank 0 gathers the records and writes the summary.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["SceneRecord", "expand_inputs", "read_scene_list", "scene_state", "run_scenes", "write_summary",
           "pixel_area_m2"]

_GLOB = set("*?[")


@dataclass
class SceneRecord:
    """One scene's line of the summary."""

    scene: str
    status: str  # done | skipped | failed
    width: Optional[int] = None
    height: Optional[int] = None
    valid_pixels: Optional[int] = None
    landslide_pixels: Optional[int] = None
    landslide_area_m2: Optional[float] = None
    seconds: float = 0.0
    warnings: list = field(default_factory=list)
    error: str = ""
    rank: int = 0


def read_scene_list(path: str | os.PathLike) -> list[str]:
    """Rasters named in a text file, one per line (relative names are relative to the file)."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"--scene-list {p}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"--scene-list {p}: not a text file (one raster path per line)") from None
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        q = Path(line)
        out.append(str(q if q.is_absolute() else p.parent / q))
    if not out:
        raise ValueError(f"--scene-list {p}: names no raster")
    return out


def expand_inputs(inputs: Sequence[str], scene_list: Optional[str] = None) -> list[str]:
    """INPUT arguments (files or glob patterns) and the ``--scene-list`` file, in order.

    Raises:
        ValueError: a pattern that matches nothing (named).
    """
    out: list[str] = []
    for item in inputs:
        if _GLOB & set(item) and not Path(item).exists():
            hits = sorted(glob.glob(item, recursive=True))
            hits = [h for h in hits if Path(h).is_file()]
            if not hits:
                raise ValueError(f"input pattern {item!r} matches no file")
            out.extend(hits)
        else:
            out.append(item)
    if scene_list:
        out.extend(read_scene_list(scene_list))
    return out  # a scene named twice is refused by the caller (two scenes, one output name)


def _raster_size(path) -> tuple[int, int]:
    import rasterio

    with rasterio.open(path) as ds:
        return ds.width, ds.height


def scene_state(plan: dict, checkpoint: str) -> tuple[str, str]:
    """Whether a scene's outputs are ``complete``, ``absent``, ``partial`` or ``stale`` (made with
    another checkpoint), and why."""
    outputs = [plan[k] for k in ("prob", "mask", "vector", "quicklook") if plan.get(k)]
    report = Path(plan["report"])
    present = [p for p in outputs + [str(report)] if Path(p).exists()]
    if not present:
        return "absent", ""
    try:
        doc = json.loads(report.read_text())
    except (OSError, ValueError):
        return "partial", f"{report.name} missing or unreadable"
    if str(doc.get("checkpoint")) != str(checkpoint):
        return "stale", f"its outputs were made with checkpoint {doc.get('checkpoint')!r}, not {checkpoint!r}"
    try:
        want = _raster_size(plan["files"][0])
    except Exception as e:  # rasterio raises several types; the scene's own run reports it properly
        return "partial", f"input unreadable ({e})"
    for p in outputs:
        if not Path(p).is_file():
            return "partial", f"{Path(p).name} missing"
        if p.endswith((".tif", ".tiff")):
            try:
                size = _raster_size(p)
            except Exception:  # noqa: BLE001 - corrupt output
                return "partial", f"{Path(p).name} unreadable"
            if size != want:
                return "partial", f"{Path(p).name} is {size[0]}x{size[1]}, the scene {want[0]}x{want[1]}"
    return "complete", ""


def pixel_area_m2(path) -> Optional[float]:
    """Area of one pixel of raster ``path`` in m², or None where its CRS is not in metres."""
    import rasterio

    with rasterio.open(path) as ds:
        crs, t = ds.crs, ds.transform
    if crs is None or not crs.is_projected:
        return None
    factor = crs.linear_units_factor[1] if hasattr(crs, "linear_units_factor") else 1.0
    return abs(t.a * t.e - t.b * t.d) * factor * factor


def _record_from_result(scene: str, r, seconds: float, warnings: list) -> SceneRecord:
    area = None
    out = r.mask or r.prob
    if out is not None:
        try:
            px = pixel_area_m2(out)
        except Exception:  # noqa: BLE001 - the summary must not fail on an odd CRS
            px = None
        area = None if px is None else px * r.landslide_pixels
    return SceneRecord(scene=scene, status="done", width=r.width, height=r.height, valid_pixels=r.valid_pixels,
                       landslide_pixels=r.landslide_pixels, landslide_area_m2=area, seconds=seconds,
                       warnings=list(warnings))


def _record_from_report(scene: str, plan: dict) -> SceneRecord:
    doc = json.loads(Path(plan["report"]).read_text())
    rec = SceneRecord(scene=scene, status="skipped", width=doc.get("width"), height=doc.get("height"),
                      valid_pixels=doc.get("valid_pixels"), landslide_pixels=doc.get("landslide_pixels"),
                      warnings=["outputs complete (--resume)"])
    out = plan.get("mask") or plan.get("prob")
    try:
        px = pixel_area_m2(out)
        rec.landslide_area_m2 = None if px is None or rec.landslide_pixels is None else px * rec.landslide_pixels
    except Exception:  # noqa: BLE001 - rasterio/pyproj on an odd CRS; the area is optional in a resumed record
        pass
    return rec


def run_scenes(
    plans: list[dict],
    run_one: Callable[[dict, bool], tuple[object, list]],
    *,
    checkpoint: str,
    resume: bool = False,
    overwrite: bool = False,
    summary: Optional[str | os.PathLike] = None,
    say: Callable[[str], None] = print,
    rank: int = 0,
    world: int = 1,
    gather: Optional[Callable[[list], list]] = None,
) -> int:
    """Predict every scene of ``plans`` (this rank's share), recording failures, and write the summary.

    Args:
        plans: one dict per scene (``files``, ``prob``, ``mask``, ``report``, … as built by
            ``msff.inference.cli``).
        run_one: ``run_one(plan, overwrite) -> (SceneResult, warning texts)``; raises on failure.
        checkpoint: the checkpoint argument (compared with a sidecar's under ``resume``).
        resume: skip complete scenes, redo partial ones.
        overwrite: replace existing outputs.
        summary: CSV path of the summary table (None: not written).
        say: one-line messages (stderr).
        rank, world: this process's share is ``plans[rank::world]``.
        gather: collects every rank's records on every rank (``torch.distributed.all_gather_object``);
            None in a single process.

    Returns:
        0 when every scene is done or skipped, else 1.
    """
    from msff.inference.writers import check_outputs

    records: list[SceneRecord] = []
    for i, pl in enumerate(plans):
        if i % world != rank:
            continue
        scene = " + ".join(pl["files"])
        t0 = time.perf_counter()
        try:
            replace = overwrite
            if resume and not overwrite:
                state, why = scene_state(pl, checkpoint)
                if state == "complete":
                    records.append(_record_from_report(scene, pl))
                    say(f"{scene}: skipped, outputs complete")
                    continue
                if state == "stale":
                    raise ValueError(f"{scene}: {why}; pass --overwrite to replace them")
                if state == "partial":
                    say(f"{scene}: outputs incomplete ({why}); predicting it again")
                    replace = True
            if not replace:
                check_outputs([pl.get(k) for k in ("prob", "mask", "vector", "quicklook", "report")])
            r, warns = run_one(pl, replace)
            records.append(_record_from_result(scene, r, time.perf_counter() - t0, warns))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one scene's failure is recorded; the run goes on
            if os.environ.get("MSFF_DEBUG"):
                raise
            msg = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
            say(f"error: {scene}: {msg}")
            records.append(SceneRecord(scene=scene, status="failed", seconds=time.perf_counter() - t0,
                                       error=msg.replace("\n", " ")))
        records[-1].rank = rank
    if gather is not None:
        records = gather(records)
    failed = [r for r in records if r.status == "failed"]
    if rank == 0:
        order = {" + ".join(pl["files"]): i for i, pl in enumerate(plans)}
        records.sort(key=lambda r: order.get(r.scene, 0))
        print(format_summary(records))
        if summary is not None:
            write_summary(records, summary)
            print(f"summary: {summary}")
        if failed:
            say(f"{len(failed)} of {len(records)} scene(s) failed: " + ", ".join(r.scene for r in failed))
    return 1 if failed else 0


def format_summary(records: Sequence[SceneRecord]) -> str:
    """The summary as an aligned text table."""
    head = ["scene", "status", "pixels", "valid", "landslide px", "area m²", "seconds", "warnings / error"]
    rows = [head]
    for r in records:
        rows.append([
            Path(r.scene.split(" + ")[0]).name + (" +…" if " + " in r.scene else ""), r.status,
            "" if r.width is None else f"{r.width}x{r.height}",
            "" if r.valid_pixels is None else str(r.valid_pixels),
            "" if r.landslide_pixels is None else str(r.landslide_pixels),
            "" if r.landslide_area_m2 is None else f"{r.landslide_area_m2:.0f}",
            f"{r.seconds:.1f}", r.error or "; ".join(r.warnings)[:120],
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def write_summary(records: Sequence[SceneRecord], path: str | os.PathLike) -> Path:
    """Write the records as CSV (atomically: a temporary file renamed into place)."""
    from msff.inference.writers import atomic_replace, temp_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, ".csv.part")
    try:
        with open(tmp, "w", newline="") as f:
            cols = list(asdict(records[0]).keys()) if records else [f for f in SceneRecord.__dataclass_fields__]
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in records:
                d = asdict(r)
                d["warnings"] = " | ".join(d["warnings"])
                w.writerow(d)
        atomic_replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
