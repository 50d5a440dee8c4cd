"""What ``tools/predict.py`` writes for each image, and the input listing it accepts.

Under the output folder:

* ``overlays/<stem>.png``: the prediction drawn on the image (detectron2's ``Visualizer``);
  an input whose name another input already took gets ``<stem>_1``, ``<stem>_2``, ...
* instances: ``coco_instances_results.json`` (COCO results: image_id, category_id in the
  dataset's ids, bbox XYWH, score, RLE segmentation), loadable with pycocotools'
  ``COCO.loadRes``;
* every kind: ``image_ids.json``, each input path with the image id it was given (the ids of
  the COCO results and of ``panoptic.json``; for semantic output the list of inputs
  predicted), and ``outputs.json``, each input path with the name of its output files (inputs
  of one name from several folders: ``<stem>``, ``<stem>_1``, ...);
* semantic: ``sem_seg/<stem>.png`` label maps (class index per pixel; 8-bit, 16-bit above 256
  classes);
* panoptic: ``panoptic/<stem>.png`` (COCO panoptic RGB ids) and ``panoptic.json`` (COCO
  panoptic "annotations" with segments_info in the dataset's category ids).
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from detectron2.evaluation.coco_evaluation import instances_to_coco_json

from ..modeling.postprocessing import class_labels

logger = logging.getLogger(__name__)

__all__ = ["list_inputs", "image_ids_from_coco_json", "PredictionWriter", "IMAGE_EXTS"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_inputs(inputs: Sequence[str]) -> List[str]:
    """Image files from paths, folders (their images, sorted) and glob patterns, deduplicated.

    Raises:
        FileNotFoundError: an input matches no image.
    """
    out: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p for p in glob.glob(os.path.join(item, "*"))
                           if p.lower().endswith(IMAGE_EXTS))
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(os.path.expanduser(item), recursive=True)
                           if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTS))
        if not found:
            hint = ""
            if os.path.isdir(item) and any(
                    p.lower().endswith(IMAGE_EXTS)
                    for p in glob.glob(os.path.join(item, "**", "*"), recursive=True)):
                hint = (f"; its sub-folders hold images: pass a quoted glob such as "
                        f"\"{os.path.join(item, '**', '*.png')}\"")
            raise FileNotFoundError(f"--input '{item}' matches no image "
                                    f"({', '.join(IMAGE_EXTS)}){hint}")
        out += found
    return list(dict.fromkeys(out))


def image_ids_from_coco_json(json_file: str) -> Dict[str, int]:
    """file name (as the json gives it, relative to its image root) -> image id, from a COCO
    json's "images"."""
    with open(json_file) as f:
        images = json.load(f)["images"]
    return {im["file_name"]: im["id"] for im in images}


def _parts(path: str) -> tuple:
    """The components of a path ("/" or "\\" separated), without empty and "." ones."""
    norm = os.path.normpath(path).replace("\\", "/")
    return tuple(p for p in norm.split("/") if p not in ("", "."))


class _IdMatcher:
    """Input path -> the json's image id, never another image's.

    * With ``image_root`` (the registered dataset's): only the file at ``image_root/<file_name>``
      (the same path once folders are resolved, or the same real path) has that entry's id;
      another file with the same name does not.
    * Without it (``--coco-json``): the entry whose ``file_name`` is the longest trailing part
      of the input's path; inputs that share that best match (``a/0.jpg`` and ``b/0.jpg``
      against ``0.jpg``) are ambiguous, and none of them gets the id.
    """

    def __init__(self, image_ids: Dict[str, int], image_root: str = ""):
        self.image_root = image_root
        real_root = os.path.realpath(image_root) if image_root else ""
        # one realpath for the root, not one per entry (COCO train lists 118k images)
        self.exact = {os.path.normpath(os.path.join(real_root, f)): i
                      for f, i in image_ids.items()} if image_root else {}
        self.by_name: Dict[str, List[tuple]] = {}
        for f, i in image_ids.items():
            parts = _parts(f)
            if parts:
                self.by_name.setdefault(parts[-1], []).append((parts, i))

    def match(self, path: str) -> Optional[int]:
        """The id of the json entry that ``path`` is, or None."""
        if self.image_root:
            # the folders resolved, the file itself not: a dataset of symlinked files (a
            # folder of links into a data store) keeps its ids; a link to it from elsewhere too
            folder, name = os.path.split(os.path.abspath(path))
            hit = self.exact.get(os.path.join(os.path.realpath(folder), name))
            return hit if hit is not None else self.exact.get(os.path.realpath(path))
        parts = _parts(os.path.abspath(path))
        best = None
        for fparts, i in self.by_name.get(parts[-1] if parts else "", []):
            if parts[-len(fparts):] == fparts and (best is None or len(fparts) > len(best[0])):
                best = (fparts, i)
        return None if best is None else best[1]


class PredictionWriter:
    """Accumulates per-image outputs and writes the files listed in the module docstring."""

    def __init__(self, out_dir: str, metadata, score_threshold: float = 0.5,
                 image_ids: Optional[Dict[str, int]] = None, overlays: bool = True,
                 image_root: str = ""):
        """
        Args:
            out_dir: output folder (created).
            metadata: the dataset metadata (classes, colors, id maps).
            score_threshold: instances below it are neither drawn nor written.
            image_ids: file name (as in the COCO json) -> COCO image id. Without it, images
                get their index; with it, an image it lacks, or one whose match is ambiguous,
                gets ``max id + 1 + index`` (never an id of the json's, so a result cannot be
                scored against another image) and a warning.
            overlays: write ``overlays/*.png``.
            image_root: the json's image folder: only the files there match its entries
                (see :class:`_IdMatcher`); "" matches by the trailing part of the path.
        """
        self.out_dir = out_dir
        self.metadata = metadata
        self.score_threshold = score_threshold
        self.image_ids = image_ids or {}
        self._matcher = _IdMatcher(self.image_ids, image_root)
        # ids for images the json lacks start past its largest
        self._first_free_id = max(self.image_ids.values(), default=-1) + 1
        self.overlays = overlays
        self.coco_results: List[dict] = []
        self.panoptic_annotations: List[dict] = []
        self.used_ids: Dict[str, int] = {}
        self.unmatched: List[str] = []
        self.ambiguous: List[str] = []
        self._claimed: Dict[int, str] = {}  # json id -> the input that took it
        self._stems: Dict[str, str] = {}  # output name -> input path
        self._index: Dict[str, int] = {}  # input path -> its index
        self.kinds: set = set()
        os.makedirs(out_dir, exist_ok=True)

    def _image_id(self, path: str, index: int) -> int:
        if not self.image_ids:
            return index
        i = self._matcher.match(path)
        if i is not None:
            other = self._claimed.get(i)
            if other is None:
                self._claimed[i] = path
                return i
            # a second input matches the same entry: neither can be trusted to be that image
            self.ambiguous.append(path)
            if other in self.used_ids and self.used_ids[other] == i:
                self.ambiguous.append(other)
                self._reassign(other)
        else:
            self.unmatched.append(path)
        # an id past the json's largest, so that no result can be scored against another
        # image's ground truth
        return self._first_free_id + index

    def _reassign(self, path: str) -> None:
        """Give an input that turned out ambiguous a free id, in every record written so far."""
        old = self.used_ids[path]
        new = self._first_free_id + self._index[path]
        self.used_ids[path] = new
        for r in self.coco_results:
            if r["image_id"] == old:
                r["image_id"] = new
        for a in self.panoptic_annotations:
            if a["image_id"] == old:
                a["image_id"] = new

    def _output_stem(self, path: str) -> str:
        """``<stem>``, or ``<stem>_1``, ``<stem>_2``, ... for a name another input took."""
        base = os.path.splitext(os.path.basename(path))[0]
        stem, k = base, 0
        while stem in self._stems:
            k += 1
            stem = f"{base}_{k}"
        self._stems[stem] = path
        return stem

    def add(self, path: str, index: int, bgr: np.ndarray, output: Dict) -> None:
        """Record the model ``output`` for the image ``path`` (``bgr``: (H, W, 3) uint8)."""
        from ..utils.visualize import draw_prediction

        self._index[path] = index
        stem = self._output_stem(path)
        image_id = self._image_id(path, index)
        self.used_ids[path] = image_id
        if "instances" in output:
            inst = output["instances"].to("cpu")
            inst = inst[inst.scores >= self.score_threshold]
            output = dict(output, instances=inst)
            if "panoptic_seg" not in output:
                self.kinds.add("instances")
                res = instances_to_coco_json(inst, image_id)
                rev = {v: k for k, v in getattr(self.metadata, "thing_dataset_id_to_contiguous_id",
                                                {}).items()}
                for r in res:
                    r["category_id"] = rev.get(r["category_id"], r["category_id"])
                self.coco_results += res
        if "panoptic_seg" in output:
            self.kinds.add("panoptic")
            self._write_panoptic(stem, path, image_id, *output["panoptic_seg"])
        elif "sem_seg" in output and "instances" not in output:
            self.kinds.add("sem_seg")
            label = class_labels(output["sem_seg"]).to("cpu").numpy()
            dtype = np.uint8 if output["sem_seg"].shape[0] <= 256 else np.uint16
            os.makedirs(os.path.join(self.out_dir, "sem_seg"), exist_ok=True)
            Image.fromarray(label.astype(dtype)).save(
                os.path.join(self.out_dir, "sem_seg", stem + ".png"))
        if self.overlays:
            rgb = bgr[:, :, ::-1]
            vis = draw_prediction(np.ascontiguousarray(rgb), output, self.metadata,
                                  self.score_threshold)
            os.makedirs(os.path.join(self.out_dir, "overlays"), exist_ok=True)
            cv2.imwrite(os.path.join(self.out_dir, "overlays", stem + ".png"), vis[:, :, ::-1])

    def _write_panoptic(self, stem: str, path: str, image_id: int, seg, segments_info) -> None:
        from panopticapi.utils import id2rgb

        seg = seg.to("cpu").numpy().astype(np.int64)
        things = {v: k for k, v in getattr(self.metadata, "thing_dataset_id_to_contiguous_id",
                                           {}).items()}
        stuff = {v: k for k, v in getattr(self.metadata, "stuff_dataset_id_to_contiguous_id",
                                          {}).items()}
        segs = []
        for s in segments_info or []:
            s = dict(s)
            cat = s["category_id"]
            s["category_id"] = int((things if s.get("isthing") else stuff).get(cat, cat))
            s["isthing"] = bool(s.get("isthing"))
            s["area"] = int((seg == s["id"]).sum())
            segs.append({k: (v.item() if hasattr(v, "item") else v) for k, v in s.items()})
        os.makedirs(os.path.join(self.out_dir, "panoptic"), exist_ok=True)
        Image.fromarray(id2rgb(seg)).save(os.path.join(self.out_dir, "panoptic", stem + ".png"))
        self.panoptic_annotations.append({"image_id": image_id, "file_name": stem + ".png",
                                          "segments_info": segs})

    def finish(self) -> Dict[str, str]:
        """Write the json files; returns {kind: path}."""
        written = {}
        if self.unmatched:
            shown = ", ".join(self.unmatched[:5])
            more = f" and {len(self.unmatched) - 5} more" if len(self.unmatched) > 5 else ""
            where = (f" under its image root {self._matcher.image_root}"
                     if self._matcher.image_root else "")
            logger.warning(f"{len(self.unmatched)} input image(s) are not in the COCO json of "
                           f"the image ids{where} ({shown}{more}): given ids above the json's "
                           "largest (see image_ids.json); pass --coco-json with the json that "
                           "lists them")
        if self.ambiguous:
            amb = list(dict.fromkeys(self.ambiguous))
            logger.warning(f"{len(amb)} input images match the same COCO json entry "
                           f"({', '.join(amb[:5])}): none of them gets its id (ids above the "
                           "json's largest, see image_ids.json); predict them separately or "
                           "pass --coco-json whose file names tell them apart")
        with open(os.path.join(self.out_dir, "image_ids.json"), "w") as f:
            json.dump(self.used_ids, f, indent=1)
        with open(os.path.join(self.out_dir, "outputs.json"), "w") as f:
            # input path -> the name of its files (sem_seg/<name>.png, overlays/<name>.png, ...)
            json.dump({p: stem for stem, p in self._stems.items()}, f, indent=1)
        if "instances" in self.kinds:
            p = os.path.join(self.out_dir, "coco_instances_results.json")
            with open(p, "w") as f:
                json.dump(self.coco_results, f)
            written["instances"] = p
        if "panoptic" in self.kinds:
            p = os.path.join(self.out_dir, "panoptic.json")
            m = self.metadata
            cats = [{"id": int(d), "name": m.thing_classes[c], "isthing": 1} for d, c in
                    getattr(m, "thing_dataset_id_to_contiguous_id", {}).items()]
            cats += [{"id": int(d), "name": m.stuff_classes[c], "isthing": 0} for d, c in
                     getattr(m, "stuff_dataset_id_to_contiguous_id", {}).items() if c > 0]
            with open(p, "w") as f:
                json.dump({"annotations": self.panoptic_annotations, "categories": cats}, f)
            written["panoptic"] = p
        if "sem_seg" in self.kinds:
            written["sem_seg"] = os.path.join(self.out_dir, "sem_seg")
        return written
