"""Benchmark: the QC face detectors on the default run's generated faces.

For each detector (dlib's MMOD, the world's RetinaFace) and each generated variant: images/s and the
share of images passing the paper's QC (one face, not too close) per racial group. Needs a finished
generate stage (outputs/generate). Usage: python benchmarks/qc_detector.py [--border 0.02]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from geneava.networks import faces
from geneava.stages import qc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generate-dir", default="outputs/generate")
    ap.add_argument("--border", type=float, default=0.02)
    ap.add_argument("--world", default="models/world/retinaface.safetensors")
    args = ap.parse_args()
    detectors = {
        "dlib-mmod": faces.face_detector("dlib"),
        "world-retinaface": faces.face_detector(args.world),
    }
    for variant in ("finetuned", "baseline"):
        m = qc.generated(Path(args.generate_dir), variant, include="all")
        images = [np.asarray(Image.open(p).convert("RGB")) for p in m["path"]]
        for name, det in detectors.items():
            det.detect(images[0])  # warm-up
            start = time.perf_counter()
            verdicts = [qc.image_check(det, rgb, args.border)[0] or "pass" for rgb in images]
            took = time.perf_counter() - start
            m[name] = verdicts
            per_race = (m[name] == "pass").groupby(m["race"]).mean().round(2).to_dict()
            rate, passed = len(images) / took, np.mean(m[name] == "pass")
            print(
                f"{variant:9s} {name:17s} {rate:7.1f} img/s  pass {passed:.3f}"
                f"  {pd.Series(verdicts).value_counts().to_dict()}  by group {per_race}"
            )


if __name__ == "__main__":
    main()
