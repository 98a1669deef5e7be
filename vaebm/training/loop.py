"""The training loop both stages share: resume-or-fresh start, divergence rollback, records.

:class:`TrainLoop` holds what :class:`~.vae.VAETrainer` (stage 1) and
:class:`~.ebm.EBMTrainer` (stage 2) do alike; each subclass supplies the model-specific parts::

    kind                   "vae" / "ebm": the checkpoint kind and the log's name
    ckpt_name              file name of the checkpoint in ``out_dir``
    total                  number of iterations to train (an int attribute or property)
    train_step(it, x)      -> (stats dict, divergence reason or None); no state change on
                           divergence
    state_dict(...), load_state_dict(ck, restore_counters=...), save(path=None); save
                           writes :meth:`TrainLoop._checkpoint_state` (state + rollback point)
    _fresh_start()         collectives and inits of a run that does not resume (inside the
                           logger's lifetime, after ``torch.manual_seed(cfg.seed)``)
    _after_iteration(it)   evaluation / sample grids once ``it`` iterations are complete
    _remedy()              after a divergence: change lr_scale (or the chains' seed), return
                           the words for the event log
    _snapshot_state()      what an in-memory rollback point holds (default: state_dict())
    _resume_extra(path)    per-rank state beside the checkpoint (default: nothing)
    _on_stop(it)           callback asked to stop after iteration ``it`` (default: nothing)

The subclass ``__init__`` calls :meth:`_init_loop` first and :meth:`_open_data` where its data
source should be built. Its history dict must hold ``"iteration"`` and ``"events"`` lists and one
list per logged stat (plus an optional ``"eval"`` list, not a stat).

Rollback points depend on the iteration only, never on when the process started: a snapshot is
taken at the top of every iteration ``it`` with ``it % snapshot_every == 0`` (counted from 0; and
at the first iteration of a process resuming a checkpoint that predates this rule), and every
checkpoint carries the snapshot the loop holds (``ck["rollback"]``: a copy of it, or, when the
checkpoint's own iteration is a snapshot iteration, just the note that the snapshot is the
checkpoint's state, to be retaken on resume). A resumed process therefore rolls back to the same
state as the uninterrupted one, with the same remedy, RNG states, replay buffer and counters. A
rollback from iteration ``j`` to ``i`` drops the CSV rows of iterations ``>= i`` (they are run
again) and records itself in ``events.log``; the in-memory ``history["events"]`` keeps every
event across rollbacks.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import warnings
from pathlib import Path

import torch

from . import distributed as D
from .checkpoint import load_latest, to_cpu
from .interrupt import StopOnSignal, TrainingInterrupted
from .logging import TrainLogger

__all__ = ["TrainLoop", "RunLock", "RunLocked", "ConfigMismatch", "GUARDED_FIELDS",
           "TrainingInterrupted"]

_NOT_STATS = ("iteration", "events", "eval")  # history lists that are not per-iteration stats
LOCK_NAME = ".lock"
RUN_INFO_NAME = "run.json"
# config fields that define a run: resuming with other values mixes two runs, so it is refused
# unless allowed (the model and the run_info entries, e.g. the data set, likewise); the others
# (steps, logging, ...) may change, and each change is logged
GUARDED_FIELDS = ("lr", "batch_size", "seed", "energy_preset")
_UNLOGGED = ("out_dir", "progress", "tensorboard", "device")


class ConfigMismatch(ValueError):
    """The run being resumed was trained with other values of fields that define it."""


def _plain(v):
    """Comparable plain form: dataclasses to dicts, tuples to lists, tensors to lists."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        v = dataclasses.asdict(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def _diff_dicts(old: dict, new: dict, limit: int = 4) -> str:
    keys = [k for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k)]
    words = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:limit]]
    return ", ".join(words) + (f", ... ({len(keys)} fields)" if len(keys) > limit else "")


class RunLocked(RuntimeError):
    """Another process (or another trainer in this one) is training in the same run folder."""


class RunLock:
    """Exclusive, non-blocking lock of a run folder: ``fcntl.flock`` on ``<out_dir>/.lock``, which
    holds the PID of the holder. Locks belong to the open file, so two trainers of one process
    exclude each other too. The file stays after release (deleting it would let a third process
    lock a new file while a second still holds the old one). Where ``flock`` is unavailable
    (Windows) or the file system refuses it, the run goes on unlocked with a warning."""

    def __init__(self, out_dir):
        self.dir = Path(out_dir)
        self.path = self.dir / LOCK_NAME
        self._fd = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            held = e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() if held else ""
            os.close(fd)
            if not held:
                warnings.warn(f"cannot lock the run folder {self.dir} ({e}); training without "
                              "protection against a second trainer in the same folder")
                return self
            raise RunLocked(f"run folder {self.dir} is in use by another trainer (PID "
                            f"{holder or 'unknown'}, lock file {self.path}); wait for it to "
                            "finish or stop it, or train into another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl
        try:
            os.ftruncate(self._fd, 0)  # no stale PID for the next reader
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # also for forked children sharing the file
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class TrainLoop:
    """Base of the stage-1 and stage-2 trainers (see the module doc for the hooks)."""

    kind: str = ""
    ckpt_name: str = ""

    def _init_loop(self, cfg, model, *, callback=None, device=None) -> None:
        """Ranks, local batch and device (from ``model``'s parameters unless given), counters."""
        self.cfg, self.callback = cfg, callback
        self.rank, self.world = D.world()
        # 1.0 while a stop signal is pending on this rank: the trainers' train_step averages it
        # with their statistics (their one all-reduce), so every rank sees any rank's signal
        self._stop_pending = 0.0
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {self.world} ranks")
        self.local_batch = cfg.batch_size // self.world
        self.device = D.default_device(model, device or cfg.device)
        self.iteration = 0
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else None
        self.logger = None
        self._pending_events: list = []  # events before the logger exists (resume)
        self._snapshot, self._fail_it = None, -1

    def _open_data(self, data) -> None:
        """A callable ``data(it) -> this rank's batch`` is used as is (``self.data_fn``); a
        Dataset / tensor goes through a resumable :class:`~.distributed.BatchStream`."""
        self.stream, self.data_fn = None, None
        if callable(data) and not hasattr(data, "__getitem__"):
            self.data_fn = data
        else:
            cfg = self.cfg
            self.stream = D.BatchStream(data, cfg.batch_size, seed=cfg.seed, rank=self.rank,
                                        world=self.world, num_workers=cfg.num_workers,
                                        pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------------ state
    @property
    def ckpt_path(self) -> Path | None:
        return self.out_dir / self.ckpt_name if self.out_dir else None

    def _model_configs(self, ck: dict) -> list:
        """(what, stored, now) for the model descriptions a checkpoint holds."""
        if self.kind == "vae" and hasattr(self, "vae"):
            return [("model class", ck.get("vae_class"), type(self.vae).__name__),
                    ("model", ck.get("vae_config"), getattr(self.vae, "config", None))]
        if self.kind == "ebm" and hasattr(self, "energy"):
            return [("energy model", ck.get("energy_config"), getattr(self.energy, "config", None))]
        return []

    def _read_run_info(self) -> dict:
        p = self.out_dir / RUN_INFO_NAME if self.out_dir is not None else None
        if p is None or not p.exists():
            return {}
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _write_run_info(self, info: dict) -> None:
        if self.out_dir is None or self.rank != 0 or not info:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / f".{RUN_INFO_NAME}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(info, indent=1, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.out_dir / RUN_INFO_NAME)

    def _config_changes(self, ck: dict, run_info: dict | None) -> tuple[list, list]:
        """(refused, free): descriptions of the differences between the stored run and the
        requested one, those that define the run first."""
        from .config import to_dict
        refused, free = [], []
        stored, now = _plain(ck.get("config") or {}), _plain(to_dict(self.cfg))
        for k, v in now.items():
            if k in stored and stored[k] != v and k not in _UNLOGGED:
                (refused if k in GUARDED_FIELDS else free).append(f"{k} {stored[k]!r} -> {v!r}")
        for what, old, new in self._model_configs(ck):
            old, new = _plain(old), _plain(new)
            if old is not None and old != new:
                both = isinstance(old, dict) and isinstance(new, dict)
                refused.append(f"{what} ({_diff_dicts(old, new)})" if both
                               else f"{what} {old!r} -> {new!r}")
        info = self._read_run_info()
        for k, v in (run_info or {}).items():
            if k in info and _plain(info[k]) != _plain(v):
                refused.append(f"{k} {info[k]!r} -> {v!r}")
        return refused, free

    def resume(self, path, *, allow_config_change: bool = False, run_info: dict | None = None
               ) -> None:
        """Load the newest readable of ``path`` / ``path.prev`` and continue from it. A requested
        config that differs from the stored one in :data:`GUARDED_FIELDS`, the model or
        ``run_info`` (checked against ``<out_dir>/run.json``) raises :class:`ConfigMismatch`
        unless ``allow_config_change``; every change that goes ahead is logged as an event."""
        notes: list = []  # a fallback to .prev, logged once the state is in place
        ck, used = load_latest(path, kind=self.kind, on_fallback=notes.append)
        refused, free = self._config_changes(ck, run_info)
        if refused and not allow_config_change:
            raise ConfigMismatch(
                f"{used} was trained with other settings than requested: {'; '.join(refused)}; "
                "resuming would mix two runs. Pass --allow-config-change "
                "(run(allow_config_change=True)) to continue with the new values, or train "
                "into another folder")
        self.load_state_dict(ck)
        self._snapshot = self._stored_rollback_point(ck)
        for what in refused:
            notes.append(f"config changed on resume (allowed): {what}")
        for what in free:
            notes.append(f"config changed on resume: {what}")
        self._resume_extra(path)
        for msg in notes:
            self._event(msg)
        self._event(f"resumed from {used} at iteration {self.iteration}")

    # ------------------------------------------------------------------ hooks
    def _fresh_start(self) -> None:
        pass

    def _after_iteration(self, it: int) -> None:
        pass

    def _resume_extra(self, path) -> None:
        pass

    def _on_stop(self, it: int) -> None:
        pass

    def _snapshot_state(self) -> dict:
        return self.state_dict()

    def _remedy(self) -> str:
        """What a rollback changes before retrying (default: the learning rate lowered)."""
        self.lr_scale *= self.cfg.divergence_lr_factor
        return f"lr scale {self.lr_scale:g}"

    # ------------------------------------------------------------------ pieces
    def _event(self, msg: str) -> None:
        self.history["events"].append({"iteration": self.iteration, "message": msg})
        if self.logger is not None:
            self.logger.event(self.iteration, msg)
        else:  # written to events.log once the logger is open
            self._pending_events.append((self.iteration, msg))

    def _take_snapshot(self) -> None:
        self._snapshot = to_cpu(self._snapshot_state())
        if self.iteration > self._fail_it:  # past the last failure: the streak is over
            self.guard.failures = 0

    def _snapshot_due(self, it: int) -> bool:
        """Whether the top of iteration ``it`` takes a snapshot: on the fixed schedule (every
        ``snapshot_every`` iterations from 0), or when the loop holds none (a fresh start, a
        checkpoint at a snapshot iteration, or one written before checkpoints carried it)."""
        snap = self._snapshot
        return snap is None or (it % self.cfg.snapshot_every == 0 and it != snap["iteration"])

    def _rollback_point(self) -> dict | None:
        """What a checkpoint of the current state stores of the rollback point, so that a
        process resuming it holds the snapshot the uninterrupted one holds: at a snapshot
        iteration (not yet taken) only a note, the loop's next top takes it from the restored
        state, which is this one; else a copy of the snapshot held."""
        snap = self._snapshot
        if snap is None:
            return None
        if self._snapshot_due(self.iteration):
            return {"iteration": self.iteration, "at_checkpoint": True}
        return {"iteration": int(snap["iteration"]), "at_checkpoint": False, "state": snap}

    def _checkpoint_state(self) -> dict:
        """The dict a checkpoint holds: ``state_dict()`` and the rollback point."""
        return {**self.state_dict(), "rollback": self._rollback_point()}

    @staticmethod
    def _stored_rollback_point(ck: dict) -> dict | None:
        """The snapshot a loaded checkpoint carries (None: the loop takes one at its top)."""
        rb = ck.get("rollback")
        if not isinstance(rb, dict) or rb.get("at_checkpoint") or rb.get("state") is None:
            return None
        return rb["state"]

    def _rollback(self, it: int, reason: str) -> None:
        """Back to the last snapshot after a divergence at ``it``, with the remedy applied;
        the guard raises :class:`~.checkpoint.TrainingDiverged` after max_failures in a row.
        The CSV rows of the iterations to run again are dropped."""
        self.guard.fail(reason, it)
        failures = self.guard.failures
        how = self._remedy()  # counters survive: loaded with restore_counters=False
        events = self.history["events"]  # a record of what happened: kept across the rollback
        # a copy: the optimiser takes CPU tensors of a state dict as its own state and updates
        # them in place, which would change the snapshot a later rollback returns to
        self.load_state_dict(to_cpu(self._snapshot), restore_counters=False)
        self.history["events"] = events
        self._fail_it = max(self._fail_it, it)
        if self.logger is not None:
            self.logger.rewind(self.iteration)
        self._event(f"divergence at iteration {it}: {reason}; rolled back to iteration "
                    f"{self.iteration} ({how}; failure {failures} of {self.cfg.max_failures})")

    def _record(self, it: int, stats: dict) -> None:
        h = self.history
        h["iteration"].append(it)
        keys = [k for k in h if k not in _NOT_STATS]
        for k in keys:
            h[k].append(float(stats.get(k, 0.0)))
        if self.logger is not None and self.cfg.log_every and it % self.cfg.log_every == 0:
            self.logger.log(it, {k: float(stats.get(k, 0.0)) for k in keys})

    def _source(self, it: int):
        """Iterator of (iteration, batch) from iteration ``it`` on."""
        if self.stream is not None:
            return self.stream.iterate(it)

        def gen(i):
            while True:
                yield i, self.data_fn(i)
                i += 1
        return gen(it)

    # ------------------------------------------------------------------ loop
    def run(self, resume="auto", *, allow_config_change: bool = False,
            run_info: dict | None = None) -> dict:
        """Train until ``self.total`` iterations; returns the history dict. ``resume``: "auto"
        (continue from ``out_dir/<ckpt_name>`` or its ``.prev`` when one exists), False, or a
        path. The run folder is locked (:class:`RunLock`) from start to end: a second trainer
        on it fails at once with :class:`RunLocked`. ``run_info`` (e.g. ``{"dataset": name}``)
        is kept in ``<out_dir>/run.json`` and checked on resume like the config (see
        :meth:`resume`; ``allow_config_change`` lets the differences through, logged)."""
        lock = None
        if self.out_dir is not None and self.rank == 0:  # rank 0 holds it for all ranks
            lock = RunLock(self.out_dir).acquire()
        try:
            return self._run(resume, allow_config_change, run_info)
        finally:
            if lock is not None:
                lock.release()

    def _run(self, resume, allow_config_change=False, run_info=None) -> dict:
        cfg = self.cfg
        if resume == "auto":
            p = self.ckpt_path
            found = p is not None and (p.exists() or Path(str(p) + ".prev").exists())
            resume = p if found else None
        if resume:
            self.resume(resume, allow_config_change=allow_config_change, run_info=run_info)
            if run_info:
                self._write_run_info({**self._read_run_info(), **run_info})
        else:
            torch.manual_seed(cfg.seed)
            if run_info:
                self._write_run_info(dict(run_info))
        self.logger = TrainLogger(self.out_dir, self.kind, start=self.iteration,
                                  tensorboard=cfg.tensorboard, progress=cfg.progress,
                                  total=self.total, enabled=self.rank == 0)
        try:
            for it_, msg in self._pending_events:
                self.logger.event(it_, msg)
            self._pending_events = []
            if not resume:
                self._fresh_start()
                self._snapshot = None
            it = self.iteration
            source = self._source(it)
            with StopOnSignal() as sig:  # SIGINT / SIGTERM: finish the iteration, save, stop
                while it < self.total:
                    if self._snapshot_due(it):
                        self._take_snapshot()
                    it_data, x = next(source)
                    assert it_data == it
                    self._stop_pending = float(sig.signum is not None)
                    stats, reason = self.train_step(it, x)
                    if reason is not None:
                        self._rollback(it, reason)
                        it = self.iteration
                        source = self._source(it)
                        continue
                    self.iteration = it = it + 1
                    self._record(it - 1, stats)
                    self._after_iteration(it)
                    stop = bool(self.callback(self, it - 1, stats)) if self.callback else False
                    # every rank stops after the same iteration (a signal may reach one rank):
                    # on several ranks, by the flag all-reduced with the iteration's statistics
                    halt = stats.get("stop", 0.0) > 0 if self.world > 1 else sig.signum is not None
                    if (stop or halt or (cfg.ckpt_every and it % cfg.ckpt_every == 0)
                            or it == self.total):
                        self.save()
                    if stop:
                        self._on_stop(it - 1)
                        break
                    if halt and it < self.total:
                        self._event(f"stopped by {sig.name} after iteration {it - 1}; "
                                    f"checkpoint saved at iteration {it}")
                        raise TrainingInterrupted(sig.name, it, self.ckpt_path)
        finally:
            self.logger.close()
        return self.history
