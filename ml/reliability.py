"""Whether the vendor rates can be trusted: one verdict, with its reasons and what would help.

The rates rest on a classifier trained on the vendors' own labels. When it is weak, most of its
disagreements with the given labels are its own mistakes, and the estimate of each vendor's errors
drifts upward by many points while its interval widens (docs/method.md, Known limits). The verdict is
computed once per audit and carried by the scorecard's ``note``, ``run``'s summary and the report's
first lines, so that no figure resting on a weak classifier is printed as if it did not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ml.estimate import MIN_SLOPE, VendorRates

# The classifier's held-out accuracy against the given labels, above chance: (a - 1/K) / (1 - 1/K).
# Measured here (held-out accuracy, chance-adjusted, how far the rates read from the truth):
# digits 3 x 300, 12 epochs: 83.7%, 0.82, within 1 point; digits, 1 epoch: 69.8%, 0.66, 2-4 points
# high; Fashion-MNIST 3 x 1,000, 2 epochs: 66.5%, 0.63, 6-10 points high (a perfect vendor read 9.4%);
# CIFAR-10 photos 2 x 400 from scratch: 34.3%, 0.27, 38-45 points high; a user's photos, 2 x 400:
# 66%, 0.62, 24 points high. Below 0.70 (73% with 10 classes, 85% with 2) the drift is several points
# or more: the rule errs towards warning, since a silent 24-point error costs more than a cautious note.
MIN_CHANCE_ADJUSTED_ACCURACY = 0.70
HAND_CHECK_HALFWIDTH = 0.05  # hand checks suggested for a rate known to within +-5 points, whatever the model
PRETRAINED_BACKBONE = "efficientnet_lite0"  # the pretrained backbone available offline everywhere (ml.backbones)
SCRATCH_BACKBONE = "small_cnn"


def heldout_accuracy(probs: np.ndarray, given: np.ndarray, trained: np.ndarray | None = None) -> float:
    """Share of the images the classifier trained on (``trained`` (N,) bool, default all) whose
    out-of-fold top class (``probs`` (N, K)) is the ``given`` label (N,): its accuracy on its own
    held-out folds. NaN when it trained on none."""
    trained = np.ones(len(given), bool) if trained is None else np.asarray(trained, bool)
    if not trained.any():
        return float("nan")
    return float((probs[trained].argmax(axis=1) == given[trained]).mean())


def min_heldout_accuracy(n_classes: int) -> float:
    """The held-out accuracy below which a classifier of ``n_classes`` classes is too weak to rate vendors."""
    chance = 1.0 / max(n_classes, 1)
    return chance + MIN_CHANCE_ADJUSTED_ACCURACY * (1.0 - chance)


@dataclass(frozen=True)
class Reliability:
    """The verdict on an audit's rates.

    ``heldout_accuracy``: the classifier's accuracy on its own held-out folds against the given labels
    (NaN: not recorded, an audit saved before it was); ``n_classes``: K; ``slope`` (V,): per vendor,
    the p_error the estimator gives a wrong label minus the one it gives a right label (``s - f``,
    :func:`ml.estimate.vendor_error_rates`); ``combined`` (V,) bool: vendors whose rate combines hand
    checks, which hold whatever the model (:func:`ml.check_sampling.checked_error_rates`).
    """

    heldout_accuracy: float
    n_classes: int
    slope: np.ndarray
    combined: np.ndarray

    @property
    def min_accuracy(self) -> float:
        return min_heldout_accuracy(self.n_classes)

    @property
    def weak_classifier(self) -> bool:
        return bool(np.isfinite(self.heldout_accuracy) and self.heldout_accuracy < self.min_accuracy)

    @property
    def unreliable(self) -> np.ndarray:
        """(V,) bool: the vendors whose rate rests on the model and cannot be trusted."""
        return (self.weak_classifier | (np.asarray(self.slope) < MIN_SLOPE)) & ~self.combined

    def why(self, v: int) -> str:
        """Why vendor ``v``'s rate is unreliable, with the held-out accuracy and the detection slope."""
        slope = float(self.slope[v])
        facts = []
        if np.isfinite(self.heldout_accuracy):
            facts.append(f"{100 * self.heldout_accuracy:.1f}% accuracy on its own held-out folds against the given "
                         f"labels ({'under' if self.weak_classifier else 'above'} the "
                         f"{100 * self.min_accuracy:.0f}% needed with {self.n_classes} classes)")
        facts.append(f"detection slope {slope:.2f} ({'under' if slope < MIN_SLOPE else 'above'} {MIN_SLOPE}: how "
                     "much more p_error a wrong label gets than a right one)")
        cause = ("the classifier that finds the errors is weak" if self.weak_classifier
                 else "wrong labels barely stand out from right ones")
        return f"{cause}: {', '.join(facts)}"


def assess_reliability(rates: VendorRates, heldout_accuracy: float, n_classes: int,
                       combined: np.ndarray | None = None) -> Reliability:
    """The verdict for ``rates`` (V vendors) from the classifier's held-out accuracy on ``n_classes``;
    ``combined`` (V,) bool: the vendors whose rate combines hand checks (default none)."""
    slope = np.asarray(rates.sensitivity - rates.false_positive, float)
    combined = np.zeros(len(slope), bool) if combined is None else np.asarray(combined, bool)
    return Reliability(float(heldout_accuracy), int(n_classes), slope, combined)


def what_would_help(backbone: str, checks_per_vendor: int | None) -> list[str]:
    """Concrete remedies: more images; a pretrained backbone unless ``backbone`` (the champion's) is
    one already; ``checks_per_vendor`` planned hand checks (None: not known)."""
    remedies = ["more images per vendor"]
    if backbone == SCRATCH_BACKBONE:
        remedies.append(f"a pretrained backbone (backbone: {PRETRAINED_BACKBONE} in vendor-audit.yaml, then "
                        "vendor-audit run --retrain)")
    if checks_per_vendor:
        remedies.append(f"planned hand checks, whose rate holds whatever the model: vendor-audit plan --budget "
                        f"{checks_per_vendor} (about {checks_per_vendor} checks per vendor for "
                        f"+-{100 * HAND_CHECK_HALFWIDTH:.0f} points)")
    else:
        remedies.append("planned hand checks, whose rate holds whatever the model: vendor-audit plan "
                        f"--halfwidth {HAND_CHECK_HALFWIDTH}")
    return remedies


UNRELIABLE = "unreliable rate"  # the note's first words: the summary finds the vendors by them


def unreliable_note(reliability: Reliability, v: int, remedies: list[str]) -> str:
    """The scorecard note of an unreliable vendor ``v``: that, why, and what would help."""
    return (f"{UNRELIABLE}, it can be many points off and only its interval says how far: {reliability.why(v)}; "
            f"what would help: {', '.join(remedies)}")


def reliability_lines(reliability: Reliability, vendors: list[str], remedies: list[str]) -> list[str]:
    """Sentences for the report's first lines, about the V ``vendors``: which rates are unreliable, why,
    and what would help; none when every rate is reliable."""
    bad = np.flatnonzero(reliability.unreliable)
    if not len(bad):
        return []
    which = "every vendor" if len(bad) == len(vendors) else ", ".join(vendors[v] for v in bad)
    lines = [f"The error rates of {which} are unreliable: they can be many points off the truth, and only their "
             "intervals say how far."]
    if reliability.weak_classifier:
        lines.append(f"The classifier that finds the errors is too weak to tell its own mistakes from the vendors': "
                     f"{100 * reliability.heldout_accuracy:.1f}% accuracy on its own held-out folds against the given "
                     f"labels, under the {100 * reliability.min_accuracy:.0f}% needed with {reliability.n_classes} "
                     "classes.")
    lines.append("Detection slope (how much more p_error a wrong label gets than a right one; under "
                 f"{MIN_SLOPE} wrong labels barely stand out): "
                 + ", ".join(f"{vendors[v]} {float(reliability.slope[v]):.2f}" for v in bad) + ".")
    lines.append("What would help: " + "; ".join(remedies) + ".")
    return lines
