"""Decoder-only backbones in Flax NNX: GPT-2 and the Llama family (Llama, Qwen2, SmolLM2, TinyStories).

One module covers both: GPT-2 is learned positions + LayerNorm + GELU MLP + biases everywhere; the
Llama family is RoPE + RMSNorm + SwiGLU + grouped-query attention (+ optional QKV bias, as in Qwen2).
Weights are stored as einsum-shaped arrays ([D, N, H] rather than [D, N*H]) so that every axis has a
name in `ava_jax.sharding`. The forward returns the last hidden states (after the final norm) and the
LM logits, and optionally reads and writes a KV cache for generation.
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from ava_jax.errors import ConfigError
from ava_jax.losses.vocab import DEFAULT_CHUNK, chunked_token_logprobs, chunked_weighted_nll
from ava_jax.models import attention as attn_lib
from ava_jax.models.config import ModelConfig
from ava_jax.models.linear import weight_einsum
from ava_jax.models.rope import apply_rope, inv_frequencies


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `S` slots, written left to right.

    All rows share the write slot `index`; per row, `valid_BxS` marks slots that hold a real token
    (prompts are left-padded) and `next_pos_B` is the position id the row's next token gets. `empty`
    (static) is True until the first tokens are written: that call, a prompt's prefill, has nothing
    earlier to attend to, so it runs `attention.resolve`'s uncached choice over its own tokens (on CPU
    the compiled kernel) and only writes the cache.
    """

    k: tuple  # per layer [B, K, S, H]: heads-major, so decoding reads it in place (`attention.cached_attention`)
    v: tuple
    valid_BxS: jax.Array
    next_pos_B: jax.Array
    index: jax.Array  # int32 scalar
    empty: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, slots: int) -> "KVCache":
        shape = (batch, cfg.n_kv_heads, slots, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(cfg.n_layers))
        return cls(k=zeros, v=zeros, valid_BxS=jnp.zeros((batch, slots), bool),
                   next_pos_B=jnp.zeros((batch,), jnp.int32), index=jnp.zeros((), jnp.int32), empty=True)


@flax.struct.dataclass
class BackboneOutput:
    hidden: jax.Array  # [B, T, D], after the final norm
    logits: jax.Array | None  # [B, T, V], float32 (None when called with logits=False)
    cache: KVCache | None = None


def _param(rngs: nnx.Rngs, shape, cfg: ModelConfig, std: float | None = None) -> nnx.Param:
    std = cfg.init_std if std is None else std
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, cfg.jnp_param_dtype))


def _zeros(shape, cfg: ModelConfig) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, cfg.jnp_param_dtype))


class Norm(nnx.Module):
    """LayerNorm (GPT-2) or RMSNorm (Llama family), computed in float32."""

    def __init__(self, cfg: ModelConfig):
        self.rms = cfg.arch == "llama"
        self.eps = cfg.norm_eps
        self.scale = nnx.Param(jnp.ones((cfg.d_model,), cfg.jnp_param_dtype))
        self.bias = None if self.rms else _zeros((cfg.d_model,), cfg)

    def __call__(self, x_BxTxD):
        x = x_BxTxD.astype(jnp.float32)
        if self.rms:
            y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
            y = y * self.scale[...].astype(jnp.float32)
        else:
            mean = jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
            y = (x - mean) * jax.lax.rsqrt(var + self.eps)
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x_BxTxD.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = _param(rngs, (D, N, H), cfg)
        self.wk = _param(rngs, (D, K, H), cfg)
        self.wv = _param(rngs, (D, K, H), cfg)
        self.wo = _param(rngs, (N, H, D), cfg)
        bias = cfg.qkv_bias or cfg.arch == "gpt2"
        self.bq = _zeros((N, H), cfg) if bias else None
        self.bk = _zeros((K, H), cfg) if bias else None
        self.bv = _zeros((K, H), cfg) if bias else None
        self.bo = _zeros((D,), cfg) if cfg.arch == "gpt2" else None
        if cfg.rope is not None:
            inv_freq, self.rope_scale = inv_frequencies(cfg.rope, H, cfg.max_seq_len)
            # A tuple, not an array: it is static graph data and must hash by value for jit caching.
            self.inv_freq = tuple(float(f) for f in inv_freq)

    def __call__(self, x_BxTxD, pos_BxT, mask, layer_cache=None, index=None, prefill=False):
        """`mask` is the [B, T, S] boolean mask (XLA path) or the [B, T] key-valid mask (the others).

        With `layer_cache` the new keys and values are written at slot `index`; with `prefill` (the
        cache was empty) the new tokens attend only among themselves, as without a cache."""
        cfg, dt = self.cfg, self.cfg.jnp_dtype

        def proj(w, b):
            y = weight_einsum("btd,dnh->btnh", x_BxTxD, w[...].astype(dt))
            return y if b is None else y + b[...].astype(dt)

        q_BxTxNxH = proj(self.wq, self.bq)
        k_BxTxKxH = proj(self.wk, self.bk)
        v_BxTxKxH = proj(self.wv, self.bv)
        if cfg.rope is not None:
            q_BxTxNxH = apply_rope(q_BxTxNxH, pos_BxT, self.inv_freq, self.rope_scale)
            k_BxTxKxH = apply_rope(k_BxTxKxH, pos_BxT, self.inv_freq, self.rope_scale)
        scale = 1.0 / (cfg.head_dim ** 0.5)
        cached = layer_cache is not None and not prefill
        impl = attn_lib.resolve(cfg, cached=cached)
        if layer_cache is not None:
            # The new tokens' keys and values go into the heads-major cache at slot `index`.
            k_cache, v_cache = layer_cache
            k_BxKxSxH, v_BxKxSxH = (
                jax.lax.dynamic_update_slice_in_dim(cache, jnp.swapaxes(new, 1, 2).astype(cache.dtype), index, axis=2)
                for cache, new in ((k_cache, k_BxTxKxH), (v_cache, v_BxTxKxH)))
            layer_cache = (k_BxKxSxH, v_BxKxSxH)
        if cached:
            out_BxTxNxH = attn_lib.cached_attention(q_BxTxNxH, k_BxKxSxH.astype(dt), v_BxKxSxH.astype(dt), mask,
                                                    scale)
        elif impl in ("blocked", "cpu_kernel"):
            out_BxTxNxH = attn_lib.blocked_causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask, scale,
                                                            compiled=impl == "cpu_kernel")
        elif impl == "cudnn":
            out_BxTxNxH = attn_lib.cudnn_causal_attention(q_BxTxNxH, k_BxTxKxH.astype(dt), v_BxTxKxH.astype(dt),
                                                          mask, scale)
        else:
            # XLA's fused attention handles grouped-query heads (K divides N) without repeating K/V.
            out_BxTxNxH = jax.nn.dot_product_attention(
                q_BxTxNxH, k_BxTxKxH.astype(dt), v_BxTxKxH.astype(dt), mask=mask[:, None], scale=scale)
        y = weight_einsum("btnh,nhd->btd", out_BxTxNxH, self.wo[...].astype(dt))
        if self.bo is not None:
            y = y + self.bo[...].astype(dt)
        return y, layer_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, F = cfg.d_model, cfg.d_ff
        if cfg.arch == "gpt2":
            self.w_fc, self.b_fc = _param(rngs, (D, F), cfg), _zeros((F,), cfg)
            self.w_proj, self.b_proj = _param(rngs, (F, D), cfg), _zeros((D,), cfg)
        else:
            self.w_gate, self.w_up = _param(rngs, (D, F), cfg), _param(rngs, (D, F), cfg)
            self.w_down = _param(rngs, (F, D), cfg)

    def __call__(self, x_BxTxD):
        dt = self.cfg.jnp_dtype
        # As in Attention: every weight product is one einsum with the weight on the right, which is
        # what LoRA adapters (models.lora, through qwix) attach to; `weight_einsum` steps aside for them.
        up = lambda x, w: weight_einsum("btd,df->btf", x, w[...].astype(dt))
        down = lambda h, w: weight_einsum("btf,fd->btd", h, w[...].astype(dt))
        if self.cfg.arch == "gpt2":
            h_BxTxF = up(x_BxTxD, self.w_fc) + self.b_fc[...].astype(dt)
            h_BxTxF = jax.nn.gelu(h_BxTxF, approximate=True)  # GPT-2's "gelu_new"
            return down(h_BxTxF, self.w_proj) + self.b_proj[...].astype(dt)
        gate_BxTxF = jax.nn.silu(up(x_BxTxD, self.w_gate))
        return down(gate_BxTxF * up(x_BxTxD, self.w_up), self.w_down)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.ln_attn = Norm(cfg)
        self.attn = Attention(cfg, rngs)
        self.ln_mlp = Norm(cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BxTxD, pos_BxT, mask, layer_cache=None, index=None, prefill=False):
        a, layer_cache = self.attn(self.ln_attn(x_BxTxD), pos_BxT, mask, layer_cache, index, prefill)
        x_BxTxD = x_BxTxD + a
        return x_BxTxD + self.mlp(self.ln_mlp(x_BxTxD)), layer_cache


def _stacked_blocks(blocks):
    """(graphdef, parameters stacked over layers) when every block has the same graph, else None
    (LoRA adapting only some blocks: `lora.targets`)."""
    graphdef, first = nnx.split(blocks[0])
    states = [first] + [nnx.state(b) for b in blocks[1:]]
    if any(jax.tree.structure(s) != jax.tree.structure(first) for s in states[1:]):
        return None
    return graphdef, jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def _run_blocks_remat(graphdef, stacked, x_BxTxD, pos_BxT, mask):
    """The blocks as one `lax.scan` over their stacked parameters, each step checkpointed.

    Rematerialisation only saves memory when the recomputation cannot be scheduled next to the
    forward: XLA (on CPU at least, jax-ml/jax#19822) keeps every `jax.checkpoint`ed block's
    activations when the blocks are an unrolled Python loop, but a scan's backward loop has to
    recompute each step's body, so only the [B, T, D] carry of every layer (and what the policy
    below names) is kept. The loop body is also a fusion boundary: unrolled, XLA:CPU fuses the
    residual stream's gradient through every later layer into each layer's weight-gradient operands
    and recomputes it there, quadratic in depth (docs/performance.md). The blocks keep their own
    parameter trees (checkpoint layout, LoRA adapters, sharding rules); `_stacked_blocks` stacks
    them per step, which costs one copy of the block parameters and of their gradients.

    The checkpoint keeps the blocked attention kernel's inputs, output and log-sum-exp
    (`attention.REMAT_SAVED`), so the backward loop recomputes the norms, the output projection and
    the MLP but not the q/k/v projections or the kernel's forward (the tiny model's train step:
    about a third faster, docs/performance.md); other attention paths name nothing and the whole
    block is recomputed.
    """

    @functools.partial(jax.checkpoint,
                       policy=jax.checkpoint_policies.save_only_these_names(*attn_lib.REMAT_SAVED))
    def step(x, state):
        y, _ = nnx.merge(graphdef, state)(x, pos_BxT, mask)
        return y, None

    x_BxTxD, _ = jax.lax.scan(step, x_BxTxD, stacked)
    return x_BxTxD


class Transformer(nnx.Module):
    """The backbone. Call with int32 tokens [B, T] and an optional padding mask [B, T] (1 = real)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), cfg)
        self.pos_embed = _param(rngs, (cfg.max_seq_len, cfg.d_model), cfg, 0.01) if cfg.rope is None else None
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.ln_final = Norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else _param(rngs, (cfg.d_model, cfg.vocab_size), cfg)

    def embed_tokens(self, tokens_BxT):
        return jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.cfg.jnp_dtype)

    def __call__(self, tokens_BxT=None, mask_BxT=None, *, embeds_BxTxD=None, cache: KVCache | None = None,
                 logits: bool = True):
        """Runs the backbone.

        Args:
          tokens_BxT: int32 token ids (or pass `embeds_BxTxD`, e.g. to differentiate w.r.t. inputs).
          mask_BxT: 1 for real tokens, 0 for padding; default all ones. Padding may be on either side.
          embeds_BxTxD: input embeddings instead of tokens.
          cache: a KVCache; the new tokens are written at `cache.index` and attend to every valid slot.
          logits: False skips the LM head (use `token_logprobs` on the hidden states instead, which
            never materialises [B, T, V]).

        Returns:
          BackboneOutput(hidden [B,T,D], logits [B,T,V] float32, cache).
        """
        cfg = self.cfg
        x_BxTxD = self.embed_tokens(tokens_BxT) if embeds_BxTxD is None else embeds_BxTxD.astype(cfg.jnp_dtype)
        B, T = x_BxTxD.shape[:2]
        mask_BxT = jnp.ones((B, T), bool) if mask_BxT is None else mask_BxT.astype(bool)
        # Position ids count real tokens only, so left-padded prompts start at position 0.
        start_B = jnp.zeros((B,), jnp.int32) if cache is None else cache.next_pos_B
        pos_BxT = jnp.maximum(start_B[:, None] + jnp.cumsum(mask_BxT, axis=1, dtype=jnp.int32) - 1, 0)
        # Without a cache, or into an empty one (a prompt's prefill), the T tokens attend among themselves.
        prefill = cache is not None and cache.empty
        index = None if cache is None else cache.index
        if cache is not None:
            cache_valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, mask_BxT, index, axis=1)
        if cache is None or prefill:
            query_slot_T = key_slot_S = None
            key_valid_BxS = mask_BxT
        else:
            query_slot_T = index + jnp.arange(T)
            key_slot_S = jnp.arange(cache.valid_BxS.shape[1])
            key_valid_BxS = cache_valid_BxS
        if attn_lib.resolve(cfg, cached=cache is not None and not prefill) in ("blocked", "cpu_kernel", "cudnn"):
            mask = key_valid_BxS  # these kernels take causality and padding from the key-valid mask
        else:
            mask = attn_lib.attention_mask(key_valid_BxS, query_slot_T, key_slot_S)
        if self.pos_embed is not None:
            x_BxTxD = x_BxTxD + jnp.take(self.pos_embed[...], pos_BxT, axis=0).astype(cfg.jnp_dtype)

        new_k, new_v = [], []
        stacked = _stacked_blocks(self.blocks) if cache is None and cfg.remat_enabled() else None
        if stacked is None and cfg.remat and cache is None:
            raise ConfigError("model.remat=True runs the blocks as one scan, which needs every block to have the "
                             "same parameters; these differ (LoRA on some blocks only? see lora.targets)")
        if stacked is not None:
            x_BxTxD = _run_blocks_remat(*stacked, x_BxTxD, pos_BxT, mask)
        else:
            for i, block in enumerate(self.blocks):
                layer_cache = None if cache is None else (cache.k[i], cache.v[i])
                x_BxTxD, layer_cache = block(x_BxTxD, pos_BxT, mask, layer_cache, index, prefill)
                if cache is not None:
                    new_k.append(layer_cache[0])
                    new_v.append(layer_cache[1])
        h_BxTxD = self.ln_final(x_BxTxD)
        logits_BxTxV = self.logits(h_BxTxD) if logits else None
        if cache is not None:
            cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid_BxS=cache_valid_BxS,
                            next_pos_B=cache.next_pos_B + mask_BxT.sum(axis=1, dtype=jnp.int32),
                            index=index + T)
        return BackboneOutput(hidden=h_BxTxD, logits=logits_BxTxV, cache=cache)

    def logits(self, h_BxTxD):
        dt = self.cfg.jnp_dtype
        if self.lm_head is None:
            out = jnp.einsum("btd,vd->btv", h_BxTxD.astype(dt), self.embed[...].astype(dt))
        else:
            out = h_BxTxD.astype(dt) @ self.lm_head[...].astype(dt)
        return out.astype(jnp.float32)

    def output_matrix(self):
        """(W, vocab_major) of the LM head in the compute dtype: the tied embedding [V, D]
        (vocab_major=True) or the untied head [D, V]; what `losses.vocab` takes."""
        dt = self.cfg.jnp_dtype
        if self.lm_head is None:
            return self.embed[...].astype(dt), True
        return self.lm_head[...].astype(dt), False

    def token_logprobs(self, h_BxTxD, tokens_BxT, chunk: int = DEFAULT_CHUNK):
        """log p(y_{t+1} | y_<=t) for t = 0..T-2, [B, T-1] float32, in vocabulary chunks.

        Equal to `losses.lm.token_logprobs(self.logits(h), tokens)` without the [B, T, V] logits.
        """
        w, vocab_major = self.output_matrix()
        return chunked_token_logprobs(h_BxTxD[:, :-1].astype(self.cfg.jnp_dtype), w, tokens_BxT[:, 1:],
                                      vocab_major=vocab_major, chunk=chunk)

    def token_nll(self, h_BxTxD, tokens_BxT, weights_BxT1, chunk: int = DEFAULT_CHUNK):
        """sum_t weights_t * -log p(y_{t+1} | y_<=t) over t = 0..T-2, a float32 scalar.

        Equal to `-sum(weights * token_logprobs(h, tokens))` for constant weights [B, T-1] (they get no
        gradient), with one h W product fewer in its gradient (`losses.vocab.chunked_weighted_nll`):
        the path for the LM and SFT losses, whose per-token weights are known before the forward.
        """
        w, vocab_major = self.output_matrix()
        return chunked_weighted_nll(h_BxTxD[:, :-1].astype(self.cfg.jnp_dtype), w, tokens_BxT[:, 1:], weights_BxT1,
                                    vocab_major=vocab_major, chunk=chunk)


def param_count(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

