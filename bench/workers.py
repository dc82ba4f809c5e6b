"""What one label per photo can and cannot tell on real workers' labels: scenario H bills its "worst"
vendor for the labels that scenario HP's "split-minority" vendor must not be billed for.

``python -m bench.workers`` prints the figures for the CIFAR-10N labels (``$CIFAR10_NPZ``, ``$CIFAR10N_NPZ``).
"""

from __future__ import annotations

import numpy as np

from ml.datasets import ImageSet
from ml.simulate import WorkerLabels, label_by_workers


def billed_in_h_and_plausible_in_hp(data: ImageSet, workers: WorkerLabels, seed: int = 0) -> dict[str, float]:
    """The same photos labelled as H's ``worst`` vendor and as HP's ``split-minority`` vendor.

    Returns the share of photos on which the workers split (``split``); of the worst vendor's errors, the
    share given on split photos (``worst_errors_on_split``) and the share that are, photo for photo, the
    label the minority vendor gives there (``worst_errors_given_by_minority``): labels a scorecard must
    bill in H and must not bill in HP, though the image and the label are the same.
    """
    everything = len(data.labels)
    worst = label_by_workers(data, workers, {"v": "worst"}, everything, seed)
    minority = label_by_workers(data, workers, {"v": "split-minority"}, everything, seed)
    assert np.array_equal(worst.source, minority.source)  # one seed: the same photos in the same order
    billed = worst.wrong
    split = workers.split[worst.source]
    return {"split": float(split.mean()),
            "worst_errors_on_split": float((billed & split).sum() / max(billed.sum(), 1)),
            "worst_errors_given_by_minority": float((billed & (worst.given == minority.given)).sum()
                                                    / max(billed.sum(), 1))}


if __name__ == "__main__":
    from ml.datasets import load_cifar10_workers, load_dataset

    photos = load_dataset("cifar10")
    figures = billed_in_h_and_plausible_in_hp(photos, load_cifar10_workers())
    print(f"{len(photos.labels)} photos; the workers split on {100 * figures['split']:.1f}%; of the labels H bills "
          f"its worst vendor for, {100 * figures['worst_errors_on_split']:.1f}% are on split photos and "
          f"{100 * figures['worst_errors_given_by_minority']:.1f}% are the very label HP's minority vendor gives "
          "there and must not be billed for")
