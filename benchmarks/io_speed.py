#!/usr/bin/env python
"""Time spent outside the model when reading a folder dataset and drawing predictions.

* ``image_size`` (what a mask-folder dataset records for every image at each catalog load)
  against what it cost before it read a PNG's header only: Pillow's ``getexif()``, which
  decodes a PNG's pixels to look for EXIF after them;
* ``predict.py``'s semantic overlay, ``d2seg.utils.visualize.draw_sem_seg``, against
  detectron2's ``Visualizer.draw_sem_seg`` (matplotlib polygons per class) on the same label
  map.

    python benchmarks/io_speed.py --data ../shared/data [--out results.json]

Medians of repeated runs, one process, on the ISBI 2012 slices (512x512, 2 classes).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (imports, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the shared data folder (isbi2012_membrane/)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="", help="write the numbers as JSON here")
    args = p.parse_args(argv)

    from detectron2.utils.visualizer import Visualizer

    from d2seg.data.image_io import image_size, read_image
    from d2seg.utils.visualize import draw_sem_seg

    root = os.path.join(args.data, "isbi2012_membrane")
    files = sorted(glob.glob(os.path.join(root, "**", "*.png"), recursive=True))
    if not files:
        sys.exit(f"io_speed.py: error: --data: no PNG under {root}")

    def sizes():
        for f in files:
            image_size(f)

    def sizes_before():
        for f in files:
            with Image.open(f) as im:
                im.size, im.getexif()

    image = read_image(os.path.join(root, "train", "image", "0.png"), format="RGB")
    labels = (np.asarray(Image.open(os.path.join(root, "train", "label", "0.png"))) > 0) \
        .astype(np.int64)
    meta = SimpleNamespace(stuff_classes=["membrane", "cell"])
    out = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "images": len(files),
        "image_size_ms_per_image": _median_ms(sizes, 3) / len(files),
        "getexif_ms_per_image_before": _median_ms(sizes_before, 3) / len(files),
        "overlay_512_detectron2_visualizer_ms": _median_ms(
            lambda: Visualizer(image, meta).draw_sem_seg(labels).get_image(), args.repeats),
        "overlay_512_d2seg_draw_sem_seg_ms": _median_ms(
            lambda: draw_sem_seg(image, labels, meta), args.repeats),
    }
    print(f"image_size: {out['image_size_ms_per_image']:.3f} ms/image "
          f"(header and getexif before: {out['getexif_ms_per_image_before']:.2f}); semantic "
          f"overlay 512x512: detectron2 Visualizer {out['overlay_512_detectron2_visualizer_ms']:.1f} "
          f"ms, d2seg draw_sem_seg {out['overlay_512_d2seg_draw_sem_seg_ms']:.1f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
