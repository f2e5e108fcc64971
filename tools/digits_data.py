"""Write edgefl/data/digits.npz from scikit-learn's copy of the UCI optical digits.

Run once, by hand, when the file must be made again (it is committed):
``python tools/digits_data.py``. Needs scikit-learn; the package never does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "edgefl" / "data" / "digits.npz"


def main() -> int:
    digits = load_digits()
    images = digits.data.astype(np.uint8)  # pixel counts 0..16, exact in uint8
    labels = digits.target.astype(np.uint8)
    if not np.array_equal(images, digits.data) or not np.array_equal(labels, digits.target):
        raise SystemExit("scikit-learn's digits no longer fit in uint8")
    np.savez_compressed(OUT, images=images, labels=labels)
    print(f"{OUT}: {len(labels)} images, {OUT.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
