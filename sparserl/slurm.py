"""``sparserl sweep ... executor=slurm``: a sweep as one Slurm job array, through submitit.

Each array task runs one training process (``sparserl train``, the same command a local sweep runs)
under a small submitit wrapper, :class:`SlurmRun`. Before a time limit Slurm sends the job steps
SIGUSR2 (``--signal=USR2@<slurm.signal_lead>``); on preemption it sends SIGTERM. Both reach the
training process, which finishes its agent step, writes a checkpoint and exits with code 75
(:data:`~sparserl.interrupt.EXIT_INTERRUPTED`). On SIGUSR2 submitit's handler in the wrapper calls
:meth:`SlurmRun.checkpoint`, which waits for that exit, and requeues the task; the requeued task
runs the same command, which resumes from the checkpoint. Rerunning the sweep command skips
finished runs, leaves runs whose jobs are still queued or running alone, and submits the rest.

Everything that depends on Slurm lives here; :mod:`sparserl.sweep` plans the runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from sparserl import interrupt, provenance
from sparserl.config import ConfigError

# Defaults of the numeric ``slurm.*`` sweep keys (documented in sweep.SWEEP_KEYS).
DEFAULTS = {"slurm.time": 1440, "slurm.mem_gb": 8.0, "slurm.parallelism": 64, "slurm.signal_lead": 180}
LIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
               "SUSPENDED", "COMPLETING", "STAGE_OUT", "SIGNALING")
CHILD_EXIT_WAIT_S = 600  # a checkpoint of the largest model written to a slow shared disk


class SlurmRun(submitit.helpers.Checkpointable):
    """One array task: the training command in a child process, requeued when Slurm signals."""

    def __init__(self, command: list[str], log_path: str, env: dict[str, str]):
        """``env``: the variables the sweep sets for its runs (on top of the job's own environment)."""
        self.command, self.log_path, self.env = command, log_path, env
        self._child: subprocess.Popen | None = None

    def __call__(self) -> int:
        # the job's environment (Slurm's variables, the GPUs it was given) with the sweep's settings
        env = {**os.environ, **self.env, "SPARSERL_EXECUTOR": "slurm"}
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"$ {shlex.join(self.command)}  # slurm job {provenance.job_id() or '?'}, "
                      f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
            log.flush()
            self._child = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)
            # poll, not Popen.wait: wait holds a lock while it blocks, and checkpoint() -- run by a signal
            # handler in this thread -- must be able to wait for the child too
            while self._child.poll() is None:
                time.sleep(0.5)
            return self._child.returncode

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on SIGUSR2 before it requeues this task: let the training process write
        its checkpoint and exit (Slurm signals every process of the step; the signal is passed on in
        case it was not), then hand submitit the same command to run again."""
        child = self._child
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGUSR2)  # a second stop signal is ignored by a run already stopping
            wait_for_exit(child, CHILD_EXIT_WAIT_S)
        return submitit.helpers.DelayedSubmission(SlurmRun(self.command, self.log_path, self.env))

    def __getstate__(self) -> dict:
        return {"command": self.command, "log_path": self.log_path, "env": self.env}  # not the child process

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _child=None)


def wait_for_exit(child: subprocess.Popen, timeout_s: float) -> None:
    """Reap ``child`` within ``timeout_s`` (then kill it: the previous checkpoint is intact, checkpoints
    are written atomically). ``os.waitpid`` directly: safe inside a signal handler that interrupted
    the Popen's own polling."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:
            return  # already reaped by the Popen
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return
        time.sleep(0.2)
    child.kill()


def parse(options: dict[str, str]) -> dict[str, Any]:
    """The ``slurm.*`` sweep options, typed and checked (one-line ConfigError)."""
    out: dict[str, Any] = {k: options.get(k) for k in ("slurm.partition", "slurm.account", "slurm.sbatch")}
    for key, kind in (("slurm.time", int), ("slurm.mem_gb", float), ("slurm.parallelism", int),
                      ("slurm.signal_lead", int)):
        raw = options.get(key)
        try:
            value = DEFAULTS[key] if raw is None else kind(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a {'whole ' if kind is int else ''}number") from None
        if not value > 0:
            raise ConfigError(f"{key}={raw!r}: must be positive")
        out[key] = value
    if out["slurm.signal_lead"] >= out["slurm.time"] * 60:
        raise ConfigError(f"slurm.signal_lead={out['slurm.signal_lead']}: must be shorter than slurm.time "
                          f"({out['slurm.time']} min)")
    try:
        extra = shlex.split(out["slurm.sbatch"] or "")
    except ValueError as e:
        raise ConfigError(f"slurm.sbatch={out['slurm.sbatch']!r}: {e}") from None
    bad = [a for a in extra if not a.startswith("--")]
    if bad:
        raise ConfigError(f"slurm.sbatch: {bad[0]!r} is not a long sbatch option (--name=value)")
    out["sbatch_extra"] = extra
    return out


def parameters(opts: dict[str, Any], cpus: float, gpus: float) -> dict[str, Any]:
    """submitit's executor parameters for the sweep's options."""
    if gpus and gpus != int(gpus):
        raise ConfigError(f"gpus_per_run={gpus:g}: Slurm allocates whole GPUs per job; to share one GPU "
                          f"between runs, train a point's seeds in one job (group_seeds=true)")
    additional = {}
    for arg in opts["sbatch_extra"]:
        name, _, value = arg[2:].partition("=")
        additional[name.replace("-", "_")] = value or True
    params = {
        "timeout_min": opts["slurm.time"], "slurm_signal_delay_s": opts["slurm.signal_lead"],
        "cpus_per_task": max(1, int(round(cpus))), "mem_gb": opts["slurm.mem_gb"], "tasks_per_node": 1,
        "nodes": 1, "slurm_array_parallelism": opts["slurm.parallelism"],
        "name": "sparserl",
    }
    if gpus:
        params["gpus_per_node"] = int(gpus)
    if opts["slurm.partition"]:
        params["slurm_partition"] = opts["slurm.partition"]
    if opts["slurm.account"]:
        params["slurm_account"] = opts["slurm.account"]
    if additional:
        params["slurm_additional_parameters"] = additional
    return params


def describe(params: dict[str, Any], n_jobs: int) -> str:
    """What a dry run shows: the array and its sbatch options."""
    shown = ", ".join(f"{k}={v}" for k, v in params.items() if k != "name")
    return f"slurm: 1 job array of {n_jobs} task(s), {shown}"


def queued_runs(sweep_dir: Path) -> frozenset[str]:
    """The sweep's runs whose Slurm job (from its last submission) is still queued or running."""
    ids = read_job_ids(sweep_dir)
    live = live_jobs(sorted(set(ids.values())))
    return frozenset(run for run, job_id in ids.items() if job_id in live)


def live_jobs(job_ids: list[str]) -> dict[str, str]:
    """Job id -> state for those of ``job_ids`` still queued or running (``squeue``)."""
    if not job_ids:
        return {}
    try:
        listing = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], capture_output=True,
                                 text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] in LIVE_STATES:
            states[parts[0]] = parts[1]
    return states


def submit(jobs: list, commands: list[list[str]], logs: list[str], env: dict[str, str], folder: Path,
           params: dict[str, Any]) -> list:
    """Submit one job array; the submitit jobs in the order of ``commands``."""
    if not _has_sbatch():
        raise ConfigError("executor=slurm: no sbatch here (run the sweep on a Slurm login node)")
    # every preemption or time limit requeues: submitit counts a short job's interrupts as time-outs
    # and would stop requeuing after 3 by default
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm", slurm_max_num_timeout=10_000)
    executor.update_parameters(**params)
    settings = {k: v for k, v in env.items() if os.environ.get(k) != v}  # what the sweep adds or changes
    with executor.batch():
        submitted = [executor.submit(SlurmRun(c, log, settings)) for c, log in zip(commands, logs)]
    return submitted


def _has_sbatch() -> bool:
    import shutil

    return shutil.which("sbatch") is not None


def wait(submitted: list, jobs: list, finish: Callable[[Any, int, int], None], on_poll: Callable[[dict], None],
         poll_s: float = 2.0) -> None:
    """Wait for every task; ``finish(job, exit code, done)`` as each ends (-1: Slurm ended it without
    a result, e.g. cancelled), ``on_poll(job id -> state)`` after each look at the queue."""
    pending = dict(zip(submitted, jobs))
    done = 0
    while pending:
        for sub, job in list(pending.items()):
            if not sub.done():
                continue
            code = task_exit_code(sub, job.log)
            if code == interrupt.EXIT_INTERRUPTED and sub.state in LIVE_STATES:
                continue  # stopped by `scontrol requeue` or a preemption, and Slurm runs it again
            del pending[sub]
            done += 1
            finish(job, code, done)
        on_poll({sub.job_id: sub.state for sub in submitted})
        if pending:
            time.sleep(poll_s)


def task_exit_code(sub, log_path) -> int:
    """The training process's exit code from a finished task (-1 when Slurm ended it without one:
    cancelled, out of memory, node failure), without submitit's wait for a result that never comes."""
    if not sub.paths.result_pickle.exists():
        reason = f"slurm job {sub.job_id} ended without a result (state {sub.state})"
    else:
        try:
            return int(sub.result())
        except Exception as e:  # noqa: BLE001 - a failed task is one run, not the sweep
            reason = f"slurm job {sub.job_id} failed: {' '.join(str(e).split())[:500]}"
    with open(log_path, "a") as f:
        f.write(reason + "\n")
    return -1


def job_ids_file(sweep_dir: Path) -> Path:
    return sweep_dir / "slurm_jobs.json"


def read_job_ids(sweep_dir: Path) -> dict[str, str]:
    """Run label -> Slurm job id of the sweep's last submission."""
    try:
        data = json.loads(job_ids_file(sweep_dir).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def write_job_ids(sweep_dir: Path, ids: dict[str, str]) -> None:
    tmp = job_ids_file(sweep_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(ids, indent=1))
    tmp.replace(job_ids_file(sweep_dir))
