"""Which part of the model a stage holds (no torch: the coordinator's ledger plans with it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    """Which part of the model a stage holds: layers [start, end), plus embedding / head."""

    start: int
    end: int
    embed: bool = False
    """Holds the token embedding: takes token ids (B, T) instead of hidden states."""
    head: bool = False
    """Holds the final LayerNorm and LM head: returns logits (B, T, V) instead of hidden states."""

    def __post_init__(self) -> None:
        if not (0 <= self.start <= self.end):
            raise ValueError(f"StageSpec layers [{self.start}, {self.end}) are not a range; "
                             "need 0 <= start <= end")
        if self.start == self.end and not (self.embed or self.head):
            raise ValueError("StageSpec holds nothing: give it layers, the embedding or the head")

    def check_fits(self, n_layer: int) -> None:
        if self.end > n_layer:
            raise ValueError(f"StageSpec layers [{self.start}, {self.end}) exceed the model's "
                             f"{n_layer} layers")

    def tensor_names(self, n_layer: int) -> list[str]:
        """Hugging Face GPTJForCausalLM names of every tensor this stage holds."""
        self.check_fits(n_layer)
        names = ["transformer.wte.weight"] if self.embed else []
        for i in range(self.start, self.end):
            p = f"transformer.h.{i}."
            names += [p + "ln_1.weight", p + "ln_1.bias",
                      p + "attn.k_proj.weight", p + "attn.v_proj.weight",
                      p + "attn.q_proj.weight", p + "attn.out_proj.weight",
                      p + "mlp.fc_in.weight", p + "mlp.fc_in.bias",
                      p + "mlp.fc_out.weight", p + "mlp.fc_out.bias"]
        if self.head:
            names += ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight", "lm_head.bias"]
        return names

    @staticmethod
    def even_split(n_layer: int, n_stages: int) -> list[StageSpec]:
        """Balanced contiguous split; the first stage embeds, the last holds the head."""
        if not 1 <= n_stages <= max(n_layer, 1):
            raise ValueError(f"cannot split {n_layer} layers into {n_stages} stages")
        bounds = [round(i * n_layer / n_stages) for i in range(n_stages + 1)]
        return [StageSpec(bounds[i], bounds[i + 1], embed=i == 0, head=i == n_stages - 1)
                for i in range(n_stages)]
