"""The `generate` pipeline: load a checkpoint and print greedy or sampled continuations."""
from __future__ import annotations

import logging
import time

import jax
import ml_collections

from ava_jax import config as cfglib
from ava_jax import sharding as shd
from ava_jax.checkpoints.load import load_pretrained
from ava_jax.errors import ConfigError
from ava_jax.models.transformer import param_count
from ava_jax.sampling import generate

log = logging.getLogger(__name__)


def run(config: ml_collections.ConfigDict) -> list[str]:
    """Loads `config.model.path`, samples a continuation of each of `config.prompts`, prints them.

    Returns the decoded continuations (so notebooks and tests can use them).
    """
    path = cfglib.resolve_path(config.model.path)
    m = config.model
    model, tokenizer = load_pretrained(path, heads=cfglib.head_config(m), dtype=m.dtype,
                                       param_dtype=m.param_dtype, remat=m.remat, attention=m.attention)
    if tokenizer is None:
        raise ConfigError(f"model.path={config.model.path!r} has no tokenizer files; the generate pipeline "
                         "needs one to encode prompts and decode samples")
    mesh = shd.make_mesh(**vars(cfglib.mesh_config(config.mesh)))
    log.info("mesh: %s; model: %s, %d parameters", shd.describe(mesh), model.cfg.arch, param_count(model.backbone))
    scfg = cfglib.sampling_config(config.sampling, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    prompts = [tokenizer.encode(p, add_bos=tokenizer.bos_id is not None) for p in config.prompts]
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        out = generate(model.backbone, prompts, jax.random.key(config.seed), scfg)
        tokens, mask = jax.device_get((out.tokens, out.mask))
        dt = time.perf_counter() - t0
    texts = []
    for prompt, toks, mk in zip(config.prompts, tokens, mask):
        text = tokenizer.decode([int(t) for t, keep in zip(toks, mk) if keep])
        texts.append(text)
        print(f"--- prompt: {prompt!r}\n{prompt}{text}\n")
    log.info("generated %d tokens in %.2f s (including compilation)", int(mask.sum()), dt)
    return texts
