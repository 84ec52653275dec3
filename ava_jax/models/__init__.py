"""Backbones (GPT-2, Llama family), the TQR heads and token-position helpers."""
from ava_jax.models.config import ModelConfig, RopeConfig
from ava_jax.models.heads import HeadConfig
from ava_jax.models.positions import gather_last, token_positions
from ava_jax.models.tqr import TQR, TQROutput
from ava_jax.models.transformer import BackboneOutput, KVCache, Transformer, param_count

__all__ = ["ModelConfig", "RopeConfig", "HeadConfig", "TQR", "TQROutput", "Transformer", "KVCache",
           "BackboneOutput", "param_count", "token_positions", "gather_last"]
