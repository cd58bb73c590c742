"""Run a sweep's unfinished grid points as a job array through submitit (SLURM, or local subprocesses).

``usad-bench sweep GRID.yaml --launcher slurm --partition gpu --gpus-per-job 1 --time 240`` submits
one array task per ``--runs-per-task`` unfinished points; each task runs
``sweep.process_point`` on its points, exactly what the local launcher does in one process. Tasks
coordinate through the file system only: a point's outputs live in its own run folder, and the
feature cache writes every entry to a unique temporary file and renames it into place, so tasks
computing the same entry at once leave one complete entry (the last rename wins; both are
identical). ``--launcher submitit-local`` runs the same array as subprocesses of this machine
(how the tests check it). Logs of each task: ``<out>/.submitit/<job id>_*``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from usad_bench.errors import UsadError


@dataclass
class LaunchOptions:
    launcher: str = "local"  # local (this process), slurm, submitit-local (subprocesses on this machine)
    runs_per_task: int = 1
    partition: str | None = None
    gpus_per_job: int = 1
    cpus_per_job: int = 8
    mem_gb: int | None = None
    time_min: int = 240
    max_parallel: int = 64
    slurm_args: dict = field(default_factory=dict)  # extra sbatch options (account, qos, constraint, ...)
    wait: bool = False
    folder: Path | None = None  # submitit's logs and pickles; default <out>/.submitit


def launch_options(args) -> LaunchOptions:
    """From the parsed `sweep` arguments."""
    extra = {}
    for item in args.slurm_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsadError(f"--slurm-arg expects KEY=VALUE (an sbatch option without dashes), got {item!r}")
        extra[key.strip().replace("-", "_")] = value.strip()
    if args.runs_per_task < 1:
        raise UsadError("--runs-per-task must be at least 1")
    return LaunchOptions(
        launcher=args.launcher,
        runs_per_task=args.runs_per_task,
        partition=args.partition,
        gpus_per_job=args.gpus_per_job,
        cpus_per_job=args.cpus_per_job,
        mem_gb=args.mem_gb,
        time_min=args.time,
        max_parallel=args.max_parallel,
        slurm_args=extra,
        wait=args.wait,
    )


def make_executor(opts: LaunchOptions, folder: Path, name: str):
    import submitit

    cluster = {"slurm": "slurm", "submitit-local": "local"}.get(opts.launcher)
    if cluster is None:
        raise UsadError(f"unknown launcher {opts.launcher!r}; use local, slurm or submitit-local")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsadError("--launcher slurm needs SLURM's sbatch on the PATH (a login node); here use --launcher local")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {"timeout_min": opts.time_min, "name": name, "cpus_per_task": opts.cpus_per_job, "tasks_per_node": 1}
    if cluster == "slurm":
        params |= {"slurm_array_parallelism": opts.max_parallel, "gpus_per_node": opts.gpus_per_job}
        params |= {"slurm_partition": opts.partition} if opts.partition else {}
        params |= {"mem_gb": opts.mem_gb} if opts.mem_gb else {}
        params |= {"slurm_additional_parameters": opts.slurm_args} if opts.slurm_args else {}
    else:
        params |= {"local_visible_gpus": list(range(opts.gpus_per_job))} if _has_gpu() else {}
    executor.update_parameters(**params)
    return executor


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def submit_points(
    experiment: Path,
    exp,
    points: list,
    opts: LaunchOptions,
    device: str,
    cache_dir,
    wandb: bool,
    dry_run: bool,
    grid: dict | None = None,
) -> list:
    """Submit ``points`` (unfinished grid points) in batches of ``opts.runs_per_task``; returns the jobs."""
    index = {p.run_dir: i for i, p in enumerate(exp.points())}
    batches = [
        [index[p.run_dir] for p in points[i : i + opts.runs_per_task]]
        for i in range(0, len(points), opts.runs_per_task)
    ]
    print(f"{len(points)} unfinished runs -> {len(batches)} array tasks ({opts.launcher})")
    if dry_run or not batches:
        return []
    folder = Path(opts.folder or exp.out / ".submitit")
    executor = make_executor(opts, folder, name=f"usad-{exp.name}")
    workdir = os.getcwd()  # experiment files name data relative to where the sweep was started
    cache = None if cache_dir is None else os.path.abspath(cache_dir)
    args = (os.path.abspath(experiment), workdir, device, cache, wandb, grid)
    with executor.batch():
        jobs = [executor.submit(run_task, *args, batch) for batch in batches]
    print(f"submitted job array {jobs[0].job_id.split('_')[0]}; logs under {folder}")
    if opts.wait:
        wait_for(jobs, exp, wandb)
    return jobs


def run_task(
    experiment: str, workdir: str, device: str, cache_dir: str | None, wandb: bool, grid: dict | None, indices: list
) -> list:
    """One array task: the grid points ``indices`` of ``experiment``, one after the other."""
    from usad_bench.sweep import load_experiment, override_grid, process_point

    os.chdir(workdir)
    exp = override_grid(load_experiment(Path(experiment)), grid)
    points = exp.points()
    done = []
    for n, i in enumerate(indices, 1):
        process_point(
            exp,
            points[i],
            device,
            None if cache_dir is None else Path(cache_dir),
            wandb=wandb,
            prefix=f"[{n}/{len(indices)}] ",
        )
        done.append(str(points[i].run_dir))
    return done


def wait_for(jobs: list, exp, wandb: bool) -> None:
    """Block until every task ends; one line per failed task, then an error if any failed."""
    failed = []
    for job in jobs:
        try:
            job.result()
        except Exception as exc:  # submitit re-raises the task's error (or a scheduler failure)
            failed.append(f"task {job.job_id}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}")
    print(f"{len(jobs) - len(failed)} of {len(jobs)} array tasks finished")
    if wandb:
        from usad_bench.tracking import log_sweep_summary

        log_sweep_summary(exp)
    if failed:
        raise UsadError("; ".join(failed) + " — see `usad-bench table` for the cells they leave incomplete")
