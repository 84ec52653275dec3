"""Launches one process of a multi-process run on this machine (see test_multiprocess.py):
`python multiprocess_run.py PROCESS_ID NUM_PROCESSES PORT DEVICES -- <ava_jax.main args>`."""
import os
import runpy
import sys

pid, n, port, devices = (int(x) for x in sys.argv[1:5])
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
args = sys.argv[sys.argv.index("--") + 1:]
if n > 1:
    args += ["--multihost", f"--coordinator_address=localhost:{port}", f"--num_processes={n}",
             f"--process_id={pid}", f"--distributed_timeout={os.environ.get('AVA_DIST_TIMEOUT', 120)}"]
sys.argv = ["ava_jax.main", *args]
runpy.run_module("ava_jax.main", run_name="__main__")
