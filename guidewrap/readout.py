"""The host read of guided steps: per-pair alignment, skipped pairs and their warnings.

Each guided step leaves its per-pair values on the device (``alignment.Term.readout``); on an
accelerator they accumulate there, and the only host synchronisation guidance adds happens when
someone reads (``guidance_metrics()`` when logging, ``last_alignment``). On the CPU a read costs
nothing, so skipped pairs are reported at the step itself.

Examples:
    >>> import torch
    >>> from guidewrap.matching import LayerInfo, LayerPair, LayerPlan
    >>> plan = LayerPlan([LayerPair(LayerInfo("a", "Linear", (4, 2)), LayerInfo("b", "Linear", (4, 2)))])
    >>> readout = Readout("cka")
    >>> readout.add(plan, torch.tensor([[0.25], [1.0]]), set())
    >>> readout.last_alignment
    {'a<-b': 0.75}
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import MetricError, SkippedPairWarning
from .matching import LayerPlan

__all__ = ["Readout"]


@dataclass
class _Unread:
    """Per-pair values since the last host read: the latest step's ``readout`` (distances, flags),
    how many steps skipped each pair, whether any returned a non-finite distance, and which pairs'
    layers did not run."""

    plan: LayerPlan
    readout: Tensor
    skipped: Tensor
    nonfinite: Tensor
    missing: set[str]


class Readout:
    """Guided steps' per-pair values, read on the host when asked; ``skipped_pairs`` counts them."""

    def __init__(self, metric_name: str) -> None:
        self.metric_name = metric_name
        self.skipped_pairs = 0
        self._last: dict[str, float] = {}
        self._unread: _Unread | None = None
        self._forwards = {"guided_forwards": 0, "guide_forwards": 0}
        # Forwards counted while torch.compile traces a step: a tensor updated in the graph (a Python
        # int changing every step would be a guard, and a recompile, every step).
        self._traced = torch.zeros(2, dtype=torch.long)

    def count(self, key: str) -> None:
        """One more guided forward (``"guided_forwards"``) or guide forward (``"guide_forwards"``)."""
        if torch.compiler.is_compiling():
            self._traced[0 if key == "guided_forwards" else 1] += 1
        else:
            self._forwards[key] += 1

    @property
    def guided_forwards(self) -> int:
        """Guided forwards counted eagerly (the traced ones are read with :attr:`counters`)."""
        return self._forwards["guided_forwards"]

    @property
    def counters(self) -> dict[str, int]:
        """Guided forwards, guide forwards and skipped pairs so far (a snapshot)."""
        traced = self._traced.tolist()
        return {
            "guided_forwards": self._forwards["guided_forwards"] + traced[0],
            "guide_forwards": self._forwards["guide_forwards"] + traced[1],
            "skipped_pairs": self.skipped_pairs,
        }

    def restore_counters(self, counts: dict[str, int]) -> None:
        """Continue from a checkpoint's :attr:`counters`."""
        self._traced.zero_()
        self._forwards.update({k: int(v) for k, v in counts.items() if k in self._forwards})
        self.skipped_pairs = int(counts.get("skipped_pairs", self.skipped_pairs))

    def __getstate__(self) -> dict[str, object]:
        return dict(self.__dict__) | {"_unread": None}  # never device values of a step in flight

    def add(self, plan: LayerPlan, readout: Tensor, missing: set[str]) -> None:
        """One guided step's values (distances, flags), kept on the device; read now on the CPU."""
        skipped = 1.0 - readout[1]
        nonfinite = ~torch.isfinite(readout[0]) & (readout[1] == 0)
        if self._unread is None:
            self._unread = _Unread(plan, readout, skipped, nonfinite, set(missing))
        else:  # accumulate on the device since the last read: no host synchronisation
            unread = self._unread
            unread.readout, unread.skipped = readout, unread.skipped + skipped
            unread.nonfinite, unread.missing = unread.nonfinite | nonfinite, unread.missing | missing
        if _reads_at_once(readout.device):
            self.read()

    @property
    def last_alignment(self) -> dict[str, float]:
        """Per-pair alignment (1 - distance) of the last guided step, by pair key."""
        self.read()
        return self._last

    def values(
        self, loss: float, weight: float, pull: float | None = None, task_loss: float | None = None
    ) -> dict[str, float]:
        """What to log: the weighted term, the weight in force, the last measured pull (the term's
        gradient norm over the task's), the task loss when known, skipped pairs and each pair's alignment."""
        alignment = self.last_alignment  # the read first: it updates the skipped-pair count
        out = {"guidance_loss": loss, "guidance_weight": weight, "guidance_skipped_pairs": float(self.skipped_pairs)}
        if pull is not None:
            out["guidance_pull"] = pull
        if task_loss is not None:
            out["guidance_task_loss"] = task_loss
        out.update({f"guidance_align/{key}": value for key, value in alignment.items()})
        return out

    def read(self) -> None:
        """Turn the values accumulated since the last read into ``last_alignment``, the skipped-pair
        count and warnings (and raise on a non-finite custom metric result)."""
        if self._unread is None:
            return
        unread, self._unread = self._unread, None
        distances, measured = unread.readout.cpu().tolist()
        skips, bad = unread.skipped.cpu().tolist(), unread.nonfinite.cpu().tolist()
        self._last = {p.key: 1.0 - v for p, v, f in zip(unread.plan, distances, measured, strict=True) if f}
        for pair, count, nonfinite in zip(unread.plan, skips, bad, strict=True):
            if nonfinite:  # the built-in metrics never return one: a custom metric did
                raise MetricError(
                    f"metric {self.metric_name!r} returned a non-finite distance for pair {pair.key}; a metric "
                    "must return a finite distance (guard its divisions, or return a fallback for degenerate input)"
                )
            if not count:
                continue
            self.skipped_pairs += int(count)
            why = "degenerate or non-finite features"
            if pair.key in unread.missing:
                why = "a layer of it did not run, here or on another process"
            steps = "this step" if count == 1 else f"on {int(count)} steps"
            warnings.warn(
                f"guidance pair {pair.key} skipped {steps} ({why}); it adds nothing to the loss",
                SkippedPairWarning,
                stacklevel=6,
            )


def _reads_at_once(device: torch.device) -> bool:
    """A host read of CPU values costs nothing: report skipped pairs at the step itself there (not
    while torch.compile traces the step: a read would break its graph)."""
    return device.type == "cpu" and not torch.compiler.is_compiling()
