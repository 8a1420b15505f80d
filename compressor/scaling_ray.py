"""A sweep's configurations spread over Ray workers (`pip install compressor[scaling]`): a local cluster of N CPUs,
or an existing cluster joined by address. Each task takes one CPU and runs torch and ONNX Runtime with the
machine's cores / N threads, so N workers do not each start a pool of every core."""
import os

from compressor.errors import UserError

INSTALL_HINT = "pip install compressor[scaling]"


def check_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError(f"--workers / --ray-address need Ray, which is not installed: {INSTALL_HINT}") from None


def _measure_in_worker(measure, job, threads: int) -> dict:
    import torch

    from compressor.ort_runtime import set_default_threads

    torch.set_num_threads(threads)
    set_default_threads(threads)
    return measure(job)


def run_on_ray(jobs: list, workers: int, address: str | None, finished, measure) -> None:
    """Measure `jobs` as Ray tasks, measure(job) -> row each; finished(job, row) is called here, in the driver, as each one completes (the
    driver alone writes the result files). With `address`, OUT and the checkpoint must be at the same path on
    every node: the workers write the artifacts into OUT/runs/<label>/."""
    check_ray()
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot start or join a Ray cluster{f' at {address}' if address else ''}: "
                            f"{' '.join(str(exc).split())[:200]}") from None
    try:
        # joined cluster: one thread per task (its CPU); local: this machine's cores shared among the workers
        threads = 1 if address else max(1, (os.cpu_count() or 1) // workers)
        task = ray.remote(num_cpus=1, max_retries=0)(_measure_in_worker)
        pending = {task.remote(measure, job, threads): job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            finished(job, ray.get(done[0]))
    finally:
        if started_here:
            ray.shutdown()
