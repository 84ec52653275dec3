"""LoRA (models.lora through qwix, train.lora in the pipelines): adapters on every projection that
start at the base, merging equals the adapted model, the gradient of B is s A^T dL/dW, the train
step never touches (or copies) the base, and the direct and PPO pipelines run, resume and export."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ava_jax import errors
from ava_jax import sharding as shd
from ava_jax.models import TQR, lora
from ava_jax.models.transformer import Transformer
from ava_jax.train.step import fixed_params, grads_and_metrics, init_train_state, make_train_step

from conftest import tiny_config

TOKENS = (jnp.arange(24).reshape(3, 8) * 7 + 3) % 97


def _randomise_b(adapted, scale=0.05):
    for i, (_, node, name) in enumerate(lora._adapted_modules(adapted)):
        v = getattr(node, name + "_lora_b")
        v[...] = scale * jax.random.normal(jax.random.key(i), v.shape, v[...].dtype)


@pytest.mark.parametrize("arch,expected", [("llama", {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}),
                                           ("gpt2", {"wq", "wk", "wv", "wo", "w_fc", "w_proj"})])
def test_every_projection_is_adapted_starts_at_the_base_and_merges_exactly(arch, expected):
    base = Transformer(tiny_config(arch), nnx.Rngs(0))
    ref = np.asarray(base(TOKENS).logits)
    cfg = lora.LoraConfig(rank=4, alpha=8.0)
    adapted, base_graphdef = lora.apply(base, cfg)
    names = lora.adapter_names(adapted)
    assert len(names) == 2 * len(expected) and {n.rsplit(".", 1)[1] for n in names} == expected
    np.testing.assert_array_equal(np.asarray(adapted(TOKENS).logits), ref)  # B = 0
    _randomise_b(adapted)
    out = np.asarray(adapted(TOKENS).logits)
    assert np.abs(out - ref).max() > 1e-2  # the adapters act
    np.testing.assert_allclose(np.asarray(lora.merged(adapted, base_graphdef, cfg)(TOKENS).logits), out,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(base(TOKENS).logits), ref)  # the base is untouched
    # The backbone without adapters, from the adapted module's base weights: the base exactly.
    np.testing.assert_array_equal(np.asarray(nnx.merge(base_graphdef, nnx.state(adapted, lora.is_base))(TOKENS).logits),
                                  ref)
    n_lora, n_base = lora.count(adapted)
    assert n_base == sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param))) and 0 < n_lora < n_base


def test_a_rematerialised_backbone_is_adapted_like_the_layer_loop():
    """With model.remat the blocks run as copies merged inside a scan; qwix still adapts the blocks
    themselves, and the adapted model's logits and adapter gradients equal the plain loop's."""
    results = []
    for remat in (False, True):
        adapted, _ = lora.apply(Transformer(tiny_config("llama", remat=remat), nnx.Rngs(0)), lora.LoraConfig(rank=4))
        assert adapted.cfg.remat == remat and len(lora.adapter_names(adapted)) == 14
        _randomise_b(adapted)
        graphdef, adapters, base = nnx.split(adapted, nnx.LoRAParam, ...)
        grad = jax.jit(jax.value_and_grad(lambda a: jnp.mean(nnx.merge(graphdef, a, base)(TOKENS).logits ** 2)))
        results.append((np.asarray(adapted(TOKENS).logits), *grad(adapters)))
    (logits, loss, grads), (logits_r, loss_r, grads_r) = results
    np.testing.assert_allclose(logits_r, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-5)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4  # the check has teeth


def test_adapters_on_some_blocks_run_the_loop_or_name_the_key():
    """The scan needs every block alike: with adapters on block 0 only, the default (remat on, on
    CPU) runs the layer loop and equals it; remat=True says why it cannot."""
    targets = lora.LoraConfig(rank=4, targets=r"blocks/0/(attn|mlp)")
    outs = []
    for remat in (None, False):
        adapted, _ = lora.apply(Transformer(tiny_config("llama", remat=remat), nnx.Rngs(0)), targets)
        _randomise_b(adapted)
        outs.append(np.asarray(adapted(TOKENS).logits))
    np.testing.assert_array_equal(outs[0], outs[1])
    adapted, _ = lora.apply(Transformer(tiny_config("llama", remat=True), nnx.Rngs(0)), targets)
    with pytest.raises(errors.ConfigError, match="model.remat=True.*lora.targets"):
        adapted(TOKENS)


def test_adapters_round_trip_and_bad_files_name_the_tensor(tmp_path):
    base = Transformer(tiny_config("llama"), nnx.Rngs(0))
    cfg = lora.LoraConfig(rank=2, alpha=4.0)
    adapted, _ = lora.apply(base, cfg)
    _randomise_b(adapted)
    out = np.asarray(adapted(TOKENS).logits)
    d = lora.save_adapters(adapted, cfg, str(tmp_path / "adapters"), base="bundled:x")
    meta = json.load(open(os.path.join(d, lora.CONFIG_FILE)))
    assert meta["rank"] == 2 and meta["alpha"] == 4.0 and meta["base_model"] == "bundled:x"
    again, _, cfg2 = lora.load_adapters(base, d)
    assert cfg2.rank == 2 and cfg2.targets == cfg.targets
    np.testing.assert_array_equal(np.asarray(again(TOKENS).logits), out)
    other = Transformer(tiny_config("llama", d_model=48), nnx.Rngs(0))
    with pytest.raises(errors.CheckpointError, match=r"blocks\.0\.attn\.w.\.lora_a' has shape"):
        lora.load_adapters(other, d)


def test_bad_lora_settings_name_the_key():
    with pytest.raises(errors.ConfigError, match="lora.targets"):
        lora.apply(Transformer(tiny_config("llama"), nnx.Rngs(0)), lora.LoraConfig(rank=2, targets="no_such_module"))
    for kw, key in ((dict(rank=-1), "lora.rank"), (dict(alpha=0.0), "lora.alpha"), (dict(export="zip"), "lora.export"),
                    (dict(targets="("), "lora.targets")):
        with pytest.raises(errors.ConfigError, match=key):
            lora.LoraConfig(**kw)


def _lm_loss(model, batch, rng, frozen):
    del rng, frozen
    lm = model.backbone
    h = lm(batch["tokens_BxT"], logits=False).hidden
    lp = lm.token_logprobs(h, batch["tokens_BxT"])
    return -lp.sum() / lp.size, {"loss": (-lp.sum(), jnp.float32(lp.size))}


def _adapted_tqr(arch="llama", rank=4):
    model = TQR(tiny_config(arch), rngs=nnx.Rngs(0))
    model.backbone, base_graphdef = lora.apply(model.backbone, lora.LoraConfig(rank=rank, alpha=8.0))
    return model, base_graphdef


def test_the_gradient_of_b_is_s_a_transpose_the_full_weight_gradient():
    """W = W0 + s A B gives dL/dB = s A^T dL/dW: the adapters' gradients in the train step against the
    full fine-tuning gradient of the same model with the adapters merged, for an einsum-shaped
    attention weight and an MLP weight."""
    model, base_graphdef = _adapted_tqr()
    _randomise_b(model.backbone, 0.02)
    cfg = lora.LoraConfig(rank=4, alpha=8.0)
    batch = {"tokens_BxT": TOKENS}
    graphdef, params, fixed = nnx.split(model, lora.trainable, ...)
    g_lora, _ = grads_and_metrics(_lm_loss, graphdef, params, batch, None, 1, fixed=fixed)
    full = TQR(tiny_config("llama"), rngs=nnx.Rngs(0))
    full.backbone = lora.merged(model.backbone, base_graphdef, cfg)
    fg, fp = nnx.split(full, nnx.Param)
    g_full, _ = grads_and_metrics(_lm_loss, fg, fp, batch, None, 1)
    for module, name in (("attn", "wq"), ("attn", "wo"), ("mlp", "w_down")):
        blk = model.backbone.blocks[1]
        a = np.asarray(getattr(getattr(blk, module), f"{name}_lora_a")[...], np.float64)
        dw = np.asarray(g_full["backbone"]["blocks"][1][module][name][...], np.float64)
        db = np.asarray(g_lora["backbone"]["blocks"][1][module][f"{name}_lora_b"][...], np.float64)
        k = a.ndim - 1  # A's contracted axes
        expected = cfg.scale * np.tensordot(a, dw, axes=(list(range(k)), list(range(k))))
        np.testing.assert_allclose(db, expected.reshape(db.shape), rtol=1e-4, atol=1e-6)
    assert "wq" not in g_lora["backbone"]["blocks"][1]["attn"]  # no gradient of a base weight at all


def test_the_step_trains_adapters_and_heads_and_never_copies_the_base():
    model, base_graphdef = _adapted_tqr("gpt2")
    mesh = shd.make_mesh()
    tx = optax.adam(1e-2)
    with jax.set_mesh(mesh):
        fixed = fixed_params(model, lora.trainable, mesh)
        nnx.update(model, fixed)
        graphdef, state = init_train_state(model, tx, mesh, lora.trainable)
        batch = {"tokens_BxT": np.asarray(TOKENS[:2])}
        step = make_train_step(graphdef, _lm_loss, tx, mesh, state, batch, fixed=fixed)
        before = jax.tree.map(np.asarray, state.params)
        for i in range(3):
            state, m = step(state, batch, jax.random.key(i))
    n_train = sum(x.size for x in jax.tree.leaves(state.params))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_base = sum(x.size for x in jax.tree.leaves(fixed))
    assert n_opt <= 2 * n_train + 8 and n_train < n_base  # Adam's moments of the trained part only
    moved = [bool(np.abs(np.asarray(a) - b).max() > 0) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before))]
    assert any(moved)
    # The reference (the backbone without adapters) reads the same buffers as the step's base.
    ref = nnx.merge(base_graphdef, fixed["backbone"])
    for a, b in zip(jax.tree.leaves(nnx.state(ref, nnx.Param)), jax.tree.leaves(fixed["backbone"])):
        assert a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer() and not a.is_deleted()


def _direct(objective, workdir, **lora_kw):
    from ava_jax.pipelines import direct
    c = direct.default_config(objective, "tiny")
    c.workdir, c.train.progress = workdir, False
    c.lora.update(rank=4, **lora_kw)
    return c


@pytest.mark.slow
def test_lora_dpo_exports_merged_and_adapters_resumes_and_online_equals_cached(tmp_path):
    """About 2 min: the exported Hugging Face directory and the adapters give the trained policy's
    log-probs; the checkpoint holds no base weight; a resume finishes with the same result; the online
    reference (a view of the step's base weights) gives the cached reference's losses."""
    from ava_jax.checkpoints.load import load_pretrained
    from ava_jax.pipelines import direct
    workdir = str(tmp_path / "run")
    r = direct.run(_direct("dpo", workdir, export="both"))
    assert r.extra["lora"]["adapted_weights"] > 0 and r.extra["lora"]["adapter_parameters"] > 0
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["extra"]["lora"]["rank"] == 4
    trained = nnx.merge(r.graphdef, r.params)
    probe = jnp.asarray(TOKENS % trained.cfg.vocab_size)
    want = np.asarray(trained.backbone(probe).logits)
    merged, _ = load_pretrained(os.path.join(workdir, "policy"))
    np.testing.assert_allclose(np.asarray(merged.backbone(probe).logits), want, rtol=1e-4, atol=1e-4)
    from ava_jax import config as cfglib
    base, _ = load_pretrained(cfglib.resolve_path(direct.default_config("dpo", "tiny").model.path))
    adapted, _, _ = lora.load_adapters(base.backbone, os.path.join(workdir, "policy", "adapters"))
    np.testing.assert_allclose(np.asarray(adapted(probe).logits), want, rtol=1e-5, atol=1e-5)
    # The checkpoint: adapters and heads only.
    import orbax.checkpoint as ocp
    meta = ocp.PyTreeCheckpointer().metadata(os.path.join(r.checkpoint_dir, "state"))
    tree = getattr(meta, "item_metadata", None) or meta
    keys = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree["params"])[0]]
    assert keys and not any(k.endswith("['wq']") or "['embed']" in k for k in keys), keys[:5]
    again = direct.run(_direct("dpo", workdir, export="both"))
    assert again.final["heldout_loglik_chosen"] == pytest.approx(r.final["heldout_loglik_chosen"], abs=1e-6)

    def losses(d):
        rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
        return [x["train/loss"] for x in rows if "train/loss" in x]

    online = str(tmp_path / "online")
    c = _direct("dpo", online)
    c.reference.online = True
    direct.run(c)
    np.testing.assert_allclose(losses(online), losses(workdir)[:len(losses(online))], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_lora_ppo_runs_from_the_base_reference_and_exports_a_merged_policy(tmp_path):
    """About 2 min (a reward model and an SFT policy first): the initial policy judged against itself
    has KL 0, the run trains and the merged export loads."""
    from ava_jax.checkpoints.load import load_pretrained
    from ava_jax.pipelines import ppo
    c = ppo.default_config("tiny")
    c.workdir = str(tmp_path / "ppo")
    c.lora.rank = 4
    r = ppo.run(c)
    assert r.initial["kl_to_initial"] == pytest.approx(0.0, abs=1e-4)
    assert r.extra["lora"]["adapter_parameters"] > 0 and np.isfinite(r.final["gold_reward"])
    exported, _ = load_pretrained(os.path.join(c.workdir, "policy"))
    assert exported.cfg.vocab_size > 0 and not lora.adapter_names(exported.backbone)
    # The SFT stage before PPO trained adapters too (same rank), merged into the policy PPO started from.
    sft = json.load(open(os.path.join(c.workdir, "sft", "summary.json")))
    assert sft["config"]["lora"]["rank"] == 4 and sft["extra"]["lora"]["adapter_parameters"] > 0
    assert r.extra["policy_start"] == os.path.join(c.workdir, "sft", "policy")


@pytest.mark.slow
def test_lora_dpo_on_a_sharded_mesh_equals_one_device(tmp_path):
    """About 1.5 min: 4 fake devices (fsdp 2 x tensor 2, the base sharded, the online reference a
    view of it) against 1 device: the same losses and held-out likelihood."""
    import subprocess
    import sys
    from conftest import REPO
    out = {}
    for n, mesh in ((1, []), (4, ["--config.mesh.fsdp=2", "--config.mesh.tensor=2"])):
        workdir = str(tmp_path / f"d{n}")
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
        p = subprocess.run([sys.executable, "-m", "ava_jax.main", "--config=configs/dpo.py:tiny", "--config.lora.rank=4",
                            "--config.reference.online=True", "--config.train.progress=False", "--config.export=False",
                            f"--config.workdir={workdir}", *mesh], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
        summary = json.load(open(os.path.join(workdir, "summary.json")))
        out[n] = ([x["train/loss"] for x in rows if "train/loss" in x], summary["final"]["heldout_loglik_chosen"])
    assert out[1][0] and len(out[1][0]) == len(out[4][0])
    np.testing.assert_allclose(out[4][0], out[1][0], rtol=0, atol=1e-5)
    assert out[4][1] == pytest.approx(out[1][1], abs=1e-5)
