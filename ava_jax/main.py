"""Entry point: `python -m ava_jax.main --config=configs/<x>.py[:variant] --config.key=value`.

Parses flags (the config is locked, so a misspelt key is an error), initialises `jax.distributed`
on multi-host runs, logs the devices and dispatches on `config.pipeline`.

The console shows ava_jax's own INFO lines (what the run does), every library's warnings and the
progress bar; the libraries' INFO chatter (Orbax, absl, jax, grain, TFDS) only with `--verbose`
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

from ava_jax import errors, pipelines
from ava_jax.train.preemption import Preempted

log = logging.getLogger("ava_jax.main")  # not __name__, which is "__main__" under `python -m`
USER_ERROR_STATUS = 2

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:variant]).",
                                          lock_config=True)
_MULTIHOST = flags.DEFINE_bool("multihost", bool(os.environ.get("AVA_MULTIHOST")),
                               "Call jax.distributed.initialize() first (TPU pods, multi-node GPU).")
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


def main(argv):
    del argv
    _configure_logging()
    if _MULTIHOST.value:
        jax.distributed.initialize()
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<experiment>.py is required")
    try:
        name = config.pipeline
    except OSError as e:  # ml_collections defers a config file that failed to load to its first use
        _fail(f"--config: {_one_line(str(e).splitlines()[-1])}")
    log.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(), jax.process_count(),
             jax.devices())
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
