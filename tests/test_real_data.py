"""Brief trainings on the real data through train_net's code path, with datasets registered
from the command line (no Python), then tools/predict.py on the trained weights."""
import json
import os
import sys

import numpy as np
from PIL import Image

import d2seg  # noqa: F401
from detectron2.data import MetadataCatalog

from d2seg.engine import default_argument_parser, main

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import predict as predict_tool  # noqa: E402

FRUITS_CFG = os.path.join(REPO, "configs/FruitsNuts-InstanceSegmentation/"
                                "mask_rcnn_R_18_FPN_cpu.yaml")
ISBI_CFG = os.path.join(REPO, "configs/ISBI-SemanticSegmentation/unet_cpu_folder.yaml")


def _train(config, out, *opts):
    args = default_argument_parser().parse_args(
        ["--config-file", config, "OUTPUT_DIR", str(out), "DATALOADER.NUM_WORKERS", "0", *opts])
    return main(args)


def test_fruits_from_coco_json_train_eval_predict(shared_data, tmp_path):
    root = os.path.join(shared_data, "fruits_nuts_coco")
    spec = (f"name=rd_fruits,type=coco,json_file={root}/trainval.json,image_root={root}/images,"
            "val_fraction=0.25")
    out = tmp_path / "train"
    res = _train(FRUITS_CFG, out, "D2SEG.DATASETS.REGISTER", str((spec,)),
                 "DATASETS.TRAIN", "('rd_fruits_train',)", "DATASETS.TEST", "('rd_fruits_val',)",
                 "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "TEST.EVAL_PERIOD", "0",
                 "SOLVER.CHECKPOINT_PERIOD", "100", "INPUT.MIN_SIZE_TRAIN", "(256,)",
                 "INPUT.MAX_SIZE_TRAIN", "400", "INPUT.MIN_SIZE_TEST", "256",
                 "INPUT.MAX_SIZE_TEST", "400", "TEST.NUM_VIS", "0",
                 "D2SEG.BEST_CHECKPOINT.METRIC", "")
    # COCOEvaluator on the split's own json: AP produced for boxes and masks
    assert set(res) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        ap = res[task]["AP"]
        assert np.isnan(ap) or 0 <= ap <= 100
    val_json = MetadataCatalog.get("rd_fruits_val").json_file
    val = json.load(open(val_json))
    assert len(val["images"]) == 4
    # predict.py (with flip TTA) on 2 validation images: COCO results that pycocotools loads
    pred = tmp_path / "pred"
    # ... and 1 training image: every image id is the unsplit json's (trainval.json), not an
    # input index that could be another image's id
    train_json = MetadataCatalog.get("rd_fruits_train").json_file
    train_file = json.load(open(train_json))["images"][0]["file_name"]
    images = [os.path.join(root, "images", im["file_name"]) for im in val["images"][:2]]
    images.append(os.path.join(root, "images", train_file))
    written = predict_tool.main([
        "--config-file", FRUITS_CFG, "--input", *images, "--output", str(pred),
        "--score-threshold", "0.0", "--dataset", "rd_fruits_val", "--flip",
        "D2SEG.DATASETS.REGISTER", str((spec,)), "MODEL.WEIGHTS", str(out / "model_final.pth"),
        "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "400",
        "TEST.DETECTIONS_PER_IMAGE", "10"])
    results = json.load(open(written["instances"]))
    assert results, "no detections at score threshold 0"
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    trainval = json.load(open(f"{root}/trainval.json"))
    all_ids = {im["file_name"]: im["id"] for im in trainval["images"]}
    used = json.load(open(pred / "image_ids.json"))
    assert {os.path.basename(p): i for p, i in used.items()} == \
        {os.path.basename(p): all_ids[os.path.basename(p)] for p in images}
    gt = COCO(f"{root}/trainval.json")
    dt = gt.loadRes(results)
    assert {r["image_id"] for r in results} <= set(used.values())
    assert {r["category_id"] for r in results} <= {1, 2, 3}  # the json's category ids
    ev = COCOeval(gt, dt, "segm")
    ev.evaluate()
    ev.accumulate()
    assert len(os.listdir(pred / "overlays")) == 3


def test_isbi_folder_unet_train_hooks_predict(shared_data, tmp_path):
    base = os.path.join(shared_data, "isbi2012_membrane", "train")
    spec = (f"name=rd_isbi,type=sem_seg,image_root={base}/image,sem_seg_root={base}/label,"
            "classes=[cell,membrane],ignore_label=255,label_map={255:0,0:1},val_fraction=0.1")
    out = tmp_path / "train"
    res = _train(ISBI_CFG, out, "D2SEG.DATASETS.REGISTER", str((spec,)),
                 "DATASETS.TRAIN", "('rd_isbi_train',)", "DATASETS.TEST", "('rd_isbi_val',)",
                 "MODEL.UNET.BASE_CHANNELS", "8", "MODEL.UNET.DEPTH", "3",
                 "INPUT.CROP.SIZE", "(128, 128)", "SOLVER.IMS_PER_BATCH", "2",
                 "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1",
                 "SOLVER.CHECKPOINT_PERIOD", "2",
                 "TEST.EVAL_PERIOD", "2", "D2SEG.VAL_LOSS_PERIOD", "2",
                 "D2SEG.BEST_CHECKPOINT.METRIC", "sem_seg/mIoU", "TEST.NUM_VIS", "0")
    assert 0 <= res["sem_seg"]["mIoU"] <= 100
    # validation loss, evaluation metrics and best checkpoint
    records = [json.loads(x) for x in open(out / "metrics.json") if x.strip()]
    val_iters = [r["iteration"] for r in records if "val_total_loss" in r]
    assert len(val_iters) == 2 and all(np.isfinite(r["val_total_loss"]) for r in records
                                       if "val_total_loss" in r)
    assert sum("sem_seg/mIoU" in r for r in records) == 2
    assert os.path.isfile(out / "model_best.pth")
    assert open(out / "last_checkpoint").read().strip() == "model_final.pth"
    # TensorBoard events (detectron2's writer) carry the validation loss too
    (events,) = [f for f in os.listdir(out) if f.startswith("events.out.tfevents")]
    assert b"val_total_loss" in open(out / events, "rb").read()
    # curves after training
    im = Image.open(out / "curves.png")
    assert im.format == "PNG" and im.size[0] > 800
    log = open(out / "log.txt").read()
    assert "Dataset check" in log and "NUM_CLASSES implied by the data: 2" in log
    # sliding-window + flip prediction on full 512x512 slices with the 128-px-trained model
    pred = tmp_path / "pred"
    written = predict_tool.main([
        "--config-file", ISBI_CFG, "--input", os.path.join(base, "image", "2[0].png"),
        "--output", str(pred), "--sliding-window", "256", "256", "--overlap", "0.0", "--flip",
        "--dataset", "rd_isbi_val",
        "D2SEG.DATASETS.REGISTER", str((spec,)), "MODEL.UNET.BASE_CHANNELS", "8",
        "MODEL.UNET.DEPTH", "3", "MODEL.WEIGHTS", str(out / "model_best.pth")])
    for stem in ("20",):
        lab = np.asarray(Image.open(os.path.join(written["sem_seg"], stem + ".png")))
        assert lab.shape == (512, 512) and set(np.unique(lab)) <= {0, 1}


def test_the_documented_python_registration_script_trains(shared_data, tmp_path):
    """docs/own_data.md "Register in Python instead": the script as printed there, run as a
    user runs it (its DATA path pointed at the shared data), trains through d2seg's main."""
    import re
    import subprocess

    with open(os.path.join(REPO, "docs", "own_data.md")) as f:
        doc = f.read()
    section = doc[doc.index("### Register in Python instead"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'DATA = "../shared/data/fruits_nuts_coco"' in code
    script = tmp_path / "my_train.py"
    script.write_text(code.replace('"../shared/data/fruits_nuts_coco"',
                                   repr(os.path.join(shared_data, "fruits_nuts_coco"))))
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, str(script), "--config-file",
         "configs/FruitsNuts-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml",
         "DATASETS.TRAIN", "('fruits_py',)", "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "2",
         "TEST.NUM_VIS", "0", "OUTPUT_DIR", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isfile(out / "model_final.pth")
    log = (out / "log.txt").read_text()
    assert "fruits_py" in log and "Dataset check" in log, log[-2000:]
