"""Where training stands: the loop's own state, saved as `trainer_state.json` in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from trainer.batches import Position
from trainer.errors import CheckpointError, CorruptCheckpoint

MAX_COUNT = 1 << 53  # a count above this (not even exact as a JSON number) is not one a run reached


@dataclass
class Progress:
    """Optimizer steps done, the position in the data, what was seen, and the batch geometry of the run.

    `to_json`/`from_json` are trainer_state.json; the field names are its keys (old checkpoints read as before).
    """

    step: int = 0  # optimizer steps completed
    epoch: int = 0
    epoch_offset: int = 0  # samples of this epoch already consumed, over all ranks
    samples_seen: int = 0
    tokens_seen: int = 0
    # the batch geometry this progress was made with: a resume must have the same global batch and data
    world_size: int = 1
    micro_batch_size: int = 1
    grad_accum: int = 1
    global_batch: int | None = None
    n_rows: int | None = None
    total_steps: int = 0
    method: str = "full"

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.epoch_offset)

    def advance(self, pos: Position, samples: int, tokens: int) -> None:
        """One optimizer step done: it consumed `samples` rows (all ranks) and `tokens` real tokens, ending at `pos`."""
        self.step += 1
        self.epoch, self.epoch_offset = pos.epoch, pos.offset
        self.samples_seen += samples
        self.tokens_seen += tokens

    def resumed(self, saved: Progress, where: str = "trainer_state.json") -> Progress:
        """This run's geometry with the saved progress (step, position, counters), whose position must lie inside
        this run's data."""
        if self.n_rows is not None and saved.epoch_offset > self.n_rows:
            raise CorruptCheckpoint(
                f"{where}: epoch_offset {saved.epoch_offset} is past the {self.n_rows} rows of the data; the "
                f"checkpoint is damaged or forged: resume from an earlier one (--resume PATH)"
            )
        return replace(
            self,
            step=saved.step,
            epoch=saved.epoch,
            epoch_offset=saved.epoch_offset,
            samples_seen=saved.samples_seen,
            tokens_seen=saved.tokens_seen,
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object, where: str) -> Progress:
        """Read trainer_state.json; every value is checked (it may come from a bucket); unknown keys are left out."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: not a JSON object")
        kwargs = {}
        for f in fields(cls):
            if f.name not in data:
                if f.name in ("step", "epoch", "epoch_offset", "samples_seen", "tokens_seen", "world_size"):
                    raise CheckpointError(f"{where}: no {f.name!r}; the checkpoint is incomplete")
                continue
            value = data[f.name]
            if f.name == "method":
                ok = isinstance(value, str)
            elif value is None:
                ok = f.name in ("global_batch", "n_rows")
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT
            if not ok:
                raise CheckpointError(f"{where}: {f.name}={value!r} is not valid; the checkpoint is damaged")
            kwargs[f.name] = value
        return cls(**kwargs)
