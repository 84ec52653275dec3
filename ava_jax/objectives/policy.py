"""Policy objectives (the `direct` pipeline trains the LM itself): SFT and the DPO family.

Batches are the pair dicts of `ava_jax.data` (SFT reads the chosen halves: demonstrations). DPO
reads the reference's summed response log-probs from the batch (`batch["reference"] = {"chosen_B",
"rejected_B"}`, computed once and cached) when present, and otherwise runs the frozen reference
model (`frozen["reference"]`, online); `reference_free` needs neither.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ava_jax.losses.policy import (DpoConfig, SftConfig, dpo_loss, response_transitions, sequence_logprobs,
                                 sft_loss_terms)
from ava_jax.models.positions import token_positions
from ava_jax.objectives.forward import split_rows, stacked
from ava_jax.objectives.registry import Objective, register


def backbone_of(model):
    """The LM that generates: a TQR's backbone, or the model itself if it is a bare Transformer."""
    return getattr(model, "backbone", model)


def response_logprobs(model, tokens_BxT, mask_BxT, prompt_len_B):
    """([B] summed response-token log-probs, [B] response lengths) of the model's LM, in vocabulary
    chunks (no [B, T, V] logits)."""
    lm = backbone_of(model)
    h = lm(tokens_BxT, mask_BxT, logits=False).hidden
    response_BxT, _ = token_positions(tokens_BxT, mask_BxT, prompt_len_B)
    return sequence_logprobs(lm.token_logprobs(h, tokens_BxT), response_BxT, mask_BxT)


def pair_logprobs(model, batch):
    """((chosen sum, rejected sum), (chosen length, rejected length)) in one stacked forward."""
    tokens, mask, n = stacked(batch)
    plen = jax.numpy.concatenate([batch["chosen"]["prompt_len_B"], batch["rejected"]["prompt_len_B"]])
    total, count = response_logprobs(model, tokens, mask, plen)
    return split_rows(total, n), split_rows(count, n)


def make_sft_loss(cfg: SftConfig):
    del cfg

    def loss_fn(model, batch, rng, frozen):
        del rng, frozen
        side = batch["chosen"]
        lm = backbone_of(model)
        h = lm(side["tokens_BxT"], side["mask_BxT"], logits=False).hidden
        response_BxT, _ = token_positions(side["tokens_BxT"], side["mask_BxT"], side["prompt_len_B"])
        target_BxN = response_transitions(response_BxT, side["mask_BxT"])
        # One scalar of fixed per-token weights: its gradient is formed in the forward (no recompute).
        nll = lm.token_nll(h, side["tokens_BxT"], target_BxN)
        return sft_loss_terms(nll, jnp.sum(target_BxN, dtype=jnp.float32))
    return loss_fn


def make_dpo_loss(cfg: DpoConfig):
    def loss_fn(model, batch, rng, frozen):
        del rng
        (pc, pr), (lc, lr) = pair_logprobs(model, batch)
        rc = rr = None
        if not cfg.reference_free:
            if "reference" in batch:  # cached: computed once per dataset (reference.py)
                rc, rr = batch["reference"]["chosen_B"], batch["reference"]["rejected_B"]
            elif "reference" in frozen:  # online: the frozen reference model, no gradient
                (rc, rr), _ = pair_logprobs(frozen["reference"], batch)
                rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
            else:
                raise ValueError("DPO needs the reference's log-probs: batch['reference'] (cached) or a frozen "
                                 "model named 'reference' (online), unless loss.reference_free=True")
        return dpo_loss(pc, pr, rc, rr, cfg, len_chosen_B=lc, len_rejected_B=lr)
    return loss_fn


SFT = register(Objective(
    name="sft", title="SFT", equation="method.md section 4 (negative log-likelihood of the response tokens)",
    kinds=("policy",), data="demonstrations", config_cls=SftConfig, make_loss=make_sft_loss))

DPO = register(Objective(
    name="dpo", title="DPO", equation="Rafailov et al. 2023, Eq. 7 (and IPO, conservative, hinge: policy.md)",
    kinds=("policy",), data="pairs", config_cls=DpoConfig, make_loss=make_dpo_loss, frozen=("reference",)))
