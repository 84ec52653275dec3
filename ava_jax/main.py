"""Entry point: `python -m ava_jax.main --config=configs/<x>.py[:variant] --config.key=value`.

Parses flags (the config is locked, so a misspelt key is an error), initialises `jax.distributed`
on multi-host runs, logs the devices and dispatches on `config.pipeline`. It first raises glibc's
mmap threshold to 64 MiB (`ava_jax.malloc`), which a user's own GLIBC_TUNABLES overrides.

The console shows ava_jax's own INFO lines (what the run does), every library's warnings and the
progress bar, with the log lines printed above the bar (`train.loop.logs_above_bars`); the
libraries' INFO chatter (Orbax, absl, jax, grain, TFDS) only with `--verbose`
(or absl's `--verbosity=0`, which also sets ava_jax's level). A user error (`errors.is_user_error`:
an unknown config key or bad value, a missing file, a bad data row, an unknown pipeline or variant)
ends with one line, `error: <message naming the key or file:line>`, and exit status 2; any other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import ast
import logging
import os
import re
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from ava_jax import errors, malloc, pipelines
from ava_jax.train.preemption import Preempted

log = logging.getLogger("ava_jax.main")  # not __name__, which is "__main__" under `python -m`
USER_ERROR_STATUS = 2

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:variant]).",
                                          lock_config=True)
_MULTIHOST = flags.DEFINE_bool("multihost", bool(os.environ.get("AVA_MULTIHOST")),
                               "Call jax.distributed.initialize() first (TPU pods, multi-node GPU).")
# jax.distributed.initialize's own argument names, for clusters without auto-detection (and the tests).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (with --multihost).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --multihost).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --multihost).")
_DIST_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for every process to join "
                                     "the coordinator before failing (with --multihost).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Also show the libraries' INFO logs (Orbax, absl, jax, grain, "
                             "TFDS); by default only ava_jax's own INFO lines and everyone's warnings print.")


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_STATUS)


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        # ml_collections pastes get_config's traceback into the flag error: keep the flag and the
        # exception's own message (the last line, less its class name).
        message = re.sub(r"^[A-Za-z_][\w.]*(Error|Exception): ", "", lines[-1])
        return f"{lines[0].split(': Error whilst')[0].rstrip(':')}: {message}"
    return " ".join(lines)


def _unknown_key_message(err: Exception, argv) -> str:
    """ml_collections' AttributeError for a `--config.a.b` the locked config lacks, as one line naming the flag."""
    text = str(err)
    if text[:1] in "'\"":  # it wraps a KeyError's repr: '\'b\'\nDid you mean "c" instead of "b"?'
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    key = lines[0].strip("'\"") if lines else ""
    names = [a.lstrip("-").split("=", 1)[0] for a in argv[1:] if re.match(r"--?config\.", a)]
    flag = next((f"--{n}" for n in names if key in n.split(".")), "a --config.* override")
    hint = f" ({' '.join(lines[1:])})" if len(lines) > 1 else ""
    return f"{flag}: unknown config key {key!r}{hint}"


def _parse_flags(argv):
    """absl's flag parsing, with each mistake reported as one `error:` line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # unknown --flag, a --config.x value of the wrong type, get_config raising
        _fail(_one_line(str(e)))
    except (AttributeError, KeyError) as e:  # ml_collections: --config.x is not a key of the locked config
        _fail(_unknown_key_message(e, argv))
    except OSError as e:  # the config file itself could not be loaded
        _fail(f"--config: {_one_line(str(e))}")


def _configure_logging() -> None:
    """Root (the libraries) at WARNING, ava_jax at INFO; --verbose: root at INFO; --verbosity: absl's level."""
    root, verbosity = logging.getLogger(), flags.FLAGS["verbosity"]
    if verbosity.present:
        pass  # absl has set the root level from --verbosity already
    elif _VERBOSE.value:
        root.setLevel(logging.INFO)
    else:
        root.setLevel(logging.WARNING)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ INFO lines (TFDS imports it)
    # An explicit --verbosity below 0 quiets ava_jax too; otherwise ava_jax says what the run does.
    quiet = verbosity.present and verbosity.value < 0
    logging.getLogger("ava_jax").setLevel(logging.NOTSET if quiet or root.level <= logging.INFO else logging.INFO)


def _wait_for_coordinator(address: str, timeout: int) -> None:
    """Process i > 0: poll the coordinator's port until it listens, so that one that never comes up
    ends with one error line (the runtime itself aborts the process with a C++ stack trace)."""
    import socket
    import time
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        _fail(f"--coordinator_address={address!r}: expected HOST:PORT")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                _fail(f"--multihost: the coordinator {address} did not answer within {timeout} s "
                      f"(--distributed_timeout): {e}")
            time.sleep(0.5)


def _initialize_distributed() -> None:
    """`jax.distributed.initialize`: auto-detected (TPU, SLURM) without arguments, or from the three
    flags; a coordinator that never answers is one error line after --distributed_timeout seconds."""
    given = {"coordinator_address": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
             "process_id": _PROCESS_ID.value}
    if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
        missing = [f"--{k}" for k, v in given.items() if v is None]
        _fail(f"--multihost with explicit processes needs all of --coordinator_address, --num_processes and "
              f"--process_id; missing {', '.join(missing)}")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU processes need a collectives backend to talk to each other (accelerators bring theirs).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {k: v for k, v in given.items() if v is not None}
    if given["coordinator_address"] and given["process_id"]:
        _wait_for_coordinator(given["coordinator_address"], _DIST_TIMEOUT.value)
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=_DIST_TIMEOUT.value)
    except Exception as e:  # noqa: BLE001 - the runtime's errors are many types; the message is the user's
        where = given["coordinator_address"] or "the auto-detected coordinator"
        _fail(f"--multihost: could not join {where} within {_DIST_TIMEOUT.value} s "
              f"(--distributed_timeout): {_one_line(str(e))[:300]}")


def main(argv):
    del argv
    _configure_logging()
    malloc.keep_temporaries_on_heap()  # XLA's CPU temporaries up to 64 MiB reused, not faulted in each step
    if _MULTIHOST.value:
        _initialize_distributed()
    elif any(f.value is not None for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
        _fail("--coordinator_address, --num_processes and --process_id need --multihost")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<experiment>.py is required")
    try:
        name = config.pipeline
    except OSError as e:  # ml_collections defers a config file that failed to load to its first use
        _fail(f"--config: {_one_line(str(e).splitlines()[-1])}")
    log.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(), jax.process_count(),
             jax.devices())
    if jax.process_index() != 0:  # one console: process 0 prints the results and says what the run does
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        logging.getLogger("ava_jax").setLevel(logging.WARNING)
    try:
        pipelines.get(name).run(config)
    except Preempted as e:  # SIGTERM: the checkpoint is saved; a scheduler restarts the same command
        log.warning("%s", e)
        sys.exit(0)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the user's to fix
        if not errors.is_user_error(e):
            raise
        _fail(_one_line(str(e)))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=_parse_flags)
