"""The sklearn 8x8 digits data set with a fixed train/test split.

No torch import here: tests load the held-out split to check the bundled
``digits`` model with onnxruntime alone.
"""

from __future__ import annotations

import numpy as np

TEST_SIZE = 0.25
RANDOM_STATE = 0


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_test, y_test)``.

    Images are float32 in [0, 1] (raw pixel values 0..16 divided by 16), shaped
    [N, 1, 8, 8]; labels are int64 in 0..9. The split is stratified with
    ``test_size=0.25`` and ``random_state=0`` so it is identical on every run.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=RANDOM_STATE, stratify=y
    )
    return (
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_test),
    )
