"""benchmarks/isbi.py and benchmarks/isbi_reference.py: the precisions a run trained and
evaluated in are recorded, and the plain-PyTorch reference trains and evaluates in the
precisions it is given."""
import os
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import isbi  # noqa: E402  (benchmarks/isbi.py)
import isbi_reference  # noqa: E402  (benchmarks/isbi_reference.py)


@pytest.mark.parametrize("amp,expected", [("bfloat16", "bf16"), ("float16", "fp16"),
                                          ("off", "fp32")])
def test_isbi_reads_the_training_precision_from_the_fast_paths_line(amp, expected):
    log = ("[11/27 06:26:15] d2seg.engine.trainer INFO: Fast paths: family=semantic device=cpu "
           f"amp={amp} cudnn_benchmark=off tf32=off channels_last=on compile=off\n")
    assert isbi.parse_precision(log) == expected
    assert isbi.parse_precision("no fast-paths line (a d2seg without D2SEG.SPEED)") == "fp32"
    # evaluation: inference_amp (absent before session 17: fp32)
    assert isbi.parse_precision(log, "inference_amp") == "fp32"
    log = log.replace(f"amp={amp} ", f"amp={amp} inference_amp={amp} ")
    assert isbi.parse_precision(log) == expected
    assert isbi.parse_precision(log, "inference_amp") == expected


@pytest.mark.parametrize("precision,eval_precision", [("fp32", "fp32"), ("bf16", "fp32"),
                                                      ("bf16", "bf16")])
def test_reference_trains_in_the_precision_it_is_given(shared_data, tmp_path, monkeypatch,
                                                       precision, eval_precision):
    seen = []
    orig = isbi_reference.ce_dice_loss

    def loss(logits, target):
        seen.append((torch.is_autocast_cpu_enabled(), logits.dtype))
        return orig(logits, target)

    monkeypatch.setattr(isbi_reference, "ce_dice_loss", loss)
    # a forward hook sees the dtype the network computed in (the loss always gets fp32)
    from d2seg.benchmark.references import PlainUNet

    out_dtypes = []
    orig_forward = PlainUNet.forward

    def forward(self, x):
        y = orig_forward(self, x)
        out_dtypes.append(y.dtype)
        return y

    monkeypatch.setattr(PlainUNet, "forward", forward)
    r = isbi_reference.main(["--data", shared_data, "--iters", "2", "--batch", "1", "--crop",
                             "64", "--base", "4", "--device", "cpu", "--precision", precision,
                             "--eval-precision", eval_precision,
                             "--out", str(tmp_path / "r.json")])
    assert r["precision"] == precision and 0 <= r["membrane_dice"] <= 100
    assert r["inference_precision"] == eval_precision
    assert seen == [(False, torch.float32)] * 2
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}
    assert out_dtypes[:2] == [dtype[precision]] * 2  # training calls; evaluation follows
    assert out_dtypes[2:] == [dtype[eval_precision]] * 5  # the 5 validation slices
