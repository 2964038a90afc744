"""A trial's held-out scores: the NLL of every validation and test sequence at the trial's
best epoch, the file ``held_out.parquet`` in its checkpoint (so in MLflow the artifact
``checkpoint/held_out.parquet``, beside the model it scores).

One row per sequence: ``split`` (``valid`` or ``test``), ``sequence`` (its index in the
split), ``frames`` and ``nll`` (nats, the sequence's total, float64). The file's metadata
says whether the numbers are ``exact`` or a bound (DMM) and holds each split's
fingerprint (:attr:`trainables.data.Split.fingerprint`), so two trials are compared only
on the same sequences. numpy and pyarrow only: the leaderboard reads it without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .comparison import Comparison, paired_bootstrap

HELD_OUT = "held_out.parquet"
HELD_OUT_ARTIFACT = f"checkpoint/{HELD_OUT}"  # in checkpoint.ARTIFACT (that module imports torch)
HELD_OUT_SPLITS = ("valid", "test")
_METADATA = b"pyrosweep"


@dataclass(frozen=True)
class HeldOutScores:
    """Per split (``valid``, ``test``): ``nll`` ``(N,)`` each sequence's NLL, ``frames``
    ``(N,)`` its frames, and the split's ``fingerprint``; ``exact`` is False for a bound."""

    nll: dict[str, np.ndarray]
    frames: dict[str, np.ndarray]
    fingerprints: dict[str, str]
    exact: bool

    def per_frame(self, split: str) -> float:
        """The split's NLL per frame."""
        return float(self.nll[split].sum() / self.frames[split].sum())

    def compare(self, other: HeldOutScores, split: str) -> Comparison:
        """This model minus ``other`` on ``split`` (:func:`trainables.comparison.paired_bootstrap`);
        a ``ValueError`` where the two were scored on different sequences."""
        if self.fingerprints[split] != other.fingerprints[split]:
            raise ValueError(
                f"the two models were scored on different {split} sequences "
                f"({self.nll[split].shape[0]} and {other.nll[split].shape[0]} sequences, other values): "
                "they were trained on other data and cannot be compared"
            )
        return paired_bootstrap(self.nll[split], other.nll[split], self.frames[split])

    @classmethod
    def mean(cls, members: list[HeldOutScores | None]) -> HeldOutScores | None:
        """Each sequence's NLL averaged over ``members`` (one configuration's seeds, scored
        on the same sequences), exact if all are; None if any has no scores."""
        if not members or any(member is None for member in members):
            return None
        first = members[0]
        for member in members[1:]:
            if member.fingerprints != first.fingerprints:
                raise ValueError("a configuration's seeds were scored on different sequences")
        return cls(
            nll={split: np.mean([member.nll[split] for member in members], axis=0) for split in first.nll},
            frames=first.frames,
            fingerprints=first.fingerprints,
            exact=all(member.exact for member in members),
        )

    def write(self, directory: str | Path) -> Path:
        """``directory/held_out.parquet``."""
        splits = list(self.nll)
        table = pa.table(
            {
                "split": pa.array([name for name in splits for _ in self.nll[name]], pa.string()),
                "sequence": np.concatenate([np.arange(len(self.nll[name]), dtype=np.int64) for name in splits]),
                "frames": np.concatenate([self.frames[name].astype(np.int64) for name in splits]),
                "nll": np.concatenate([self.nll[name].astype(np.float64) for name in splits]),
            }
        )
        metadata = {"exact": self.exact, "fingerprints": self.fingerprints}
        path = Path(directory) / HELD_OUT
        pq.write_table(table.replace_schema_metadata({_METADATA: json.dumps(metadata)}), path)
        return path

    @classmethod
    def read(cls, path: str | Path) -> HeldOutScores:
        """Read what :meth:`write` wrote."""
        table = pq.read_table(path)
        metadata = json.loads(table.schema.metadata[_METADATA])
        columns = table.to_pydict()
        split = np.asarray(columns["split"])
        nll, frames = np.asarray(columns["nll"], np.float64), np.asarray(columns["frames"], np.int64)
        names = list(dict.fromkeys(columns["split"]))
        return cls(
            nll={name: nll[split == name] for name in names},
            frames={name: frames[split == name] for name in names},
            fingerprints=metadata["fingerprints"],
            exact=bool(metadata["exact"]),
        )
