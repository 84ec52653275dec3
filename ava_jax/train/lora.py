"""A policy pipeline's LoRA run (`config.lora.rank > 0`): adapt, share the base, export.

    lr = LoraRun.adapt(model, cfg, mesh, seed)       # model.backbone gets adapters, in place
    initial = lr.initial(model)                      # the model without adapters: the same base arrays
    run_ = start_run(model, ..., trainable=lr.trainable, views=lr.views())
    lr.export(run_.model(state), tokenizer, out_dir, save_fn, base=config.model.path)

The adapters themselves are `models.lora`. Here is what a run does with them: the base weights are
placed in their shardings once, right after adapting, so the train step's fixed parameters
(`train.step.fixed_params`), the initial policy the judges compare against, the reference (a view
of the fixed parameters in the step, or the rollouts' reference) and the cached reference log-probs
all read the same buffers. The heads, the value head and a separate critic stay fully trained.
"""
from __future__ import annotations

import dataclasses
import logging
import os

from flax import nnx

from ava_jax.models import lora
from ava_jax.train.step import FrozenModels, fixed_params

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoraRun:
    cfg: lora.LoraConfig
    base_graphdef: object  # the backbone without adapters
    model_graphdef: object  # the whole model without adapters
    fixed: object  # the placed base weights (an nnx.State whose root is "backbone")

    trainable = staticmethod(lora.trainable)

    @classmethod
    def adapt(cls, model, cfg: lora.LoraConfig, mesh, seed: int = 0) -> "LoraRun":
        model_graphdef = nnx.graphdef(model)
        model.backbone, base_graphdef = lora.apply(model.backbone, cfg, seed)
        fixed = fixed_params(model, lora.trainable, mesh)
        nnx.update(model, fixed)  # from here on the model holds the placed base: one copy, shared
        n_lora, n_base = lora.count(model.backbone)
        log.info("LoRA rank %d (alpha %g) on %d weights: %d adapter parameters, %d base parameters (%.2f%%) fixed",
                 cfg.rank, cfg.alpha, len(lora.adapter_names(model.backbone)), n_lora, n_base,
                 100.0 * n_lora / max(n_base, 1))
        return cls(cfg, base_graphdef, model_graphdef, fixed)

    def initial(self, model):
        """The model without adapters (the initial policy and the default reference): the base
        weights and the heads' initial values, no copy."""
        return nnx.merge(self.model_graphdef, nnx.state(model, lora.is_base))

    def initial_backbone(self):
        return nnx.merge(self.base_graphdef, self.fixed["backbone"])

    def views(self, name: str = "reference") -> dict:
        """The step's frozen view `name` = the backbone without adapters, read from the fixed params."""
        return {name: (self.base_graphdef, "backbone")}

    def reference(self, name: str = "reference") -> FrozenModels:
        """The backbone without adapters as FrozenModels (its parameters: the placed base weights)."""
        return FrozenModels({name: self.base_graphdef}, {name: self.fixed["backbone"]})

    def summary(self, model) -> dict:
        n_lora, n_base = lora.count(model.backbone)
        return {"rank": self.cfg.rank, "alpha": self.cfg.alpha, "targets": self.cfg.targets,
                "adapted_weights": len(lora.adapter_names(model.backbone)), "adapter_parameters": n_lora,
                "base_parameters": n_base}

    def export(self, trained, tokenizer, out_dir: str, save_fn, *, base: str = "") -> str:
        """`lora.export`: "merged" writes the base with the adapters folded in through `save_fn(model,
        tokenizer, out_dir)` (a Hugging Face directory); "adapters" writes `<out_dir>/adapters`
        (`models.lora.save_adapters`; `load_adapters` re-applies them onto the base at `base`) and
        the tokenizer; "both" writes both. `trained` is changed (its backbone merged)."""
        os.makedirs(out_dir, exist_ok=True)
        if self.cfg.export in ("adapters", "both"):
            lora.save_adapters(trained.backbone, self.cfg, os.path.join(out_dir, "adapters"), base=base)
            if self.cfg.export == "adapters" and tokenizer is not None:
                tokenizer.save(out_dir)
        if self.cfg.export in ("merged", "both"):
            trained.backbone = lora.merged(trained.backbone, self.base_graphdef, self.cfg)
            save_fn(trained, tokenizer, out_dir)
        return out_dir
