"""Objectives as pure functions returning (loss, metrics): AVRIL terms, AVA-d, AVA-p, BT, PT, SFT, DPO."""
from ava_jax.losses.ava import (
    ava_d_from_terms,
    ava_d_loss,
    ava_p_from_terms,
    ava_p_loss,
    contrastive_expected_return,
)
from ava_jax.losses.avril import AvrilInputs, QSummary, avril_terms, last_transition, transition_masks
from ava_jax.losses.baselines import bradley_terry_loss, gather_last, preference_transformer_loss
from ava_jax.losses.config import AvaConfig, BradleyTerryConfig, PreferenceTransformerConfig
from ava_jax.losses.policy import DpoConfig, SftConfig, dpo_loss, sequence_logprobs, sft_loss

__all__ = [
    "AvrilInputs",
    "QSummary",
    "AvaConfig",
    "DpoConfig",
    "SftConfig",
    "dpo_loss",
    "sequence_logprobs",
    "sft_loss",
    "BradleyTerryConfig",
    "PreferenceTransformerConfig",
    "avril_terms",
    "ava_d_from_terms",
    "ava_d_loss",
    "ava_p_from_terms",
    "ava_p_loss",
    "bradley_terry_loss",
    "contrastive_expected_return",
    "gather_last",
    "last_transition",
    "preference_transformer_loss",
    "transition_masks",
]
