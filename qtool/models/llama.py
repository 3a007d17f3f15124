"""The Llama block family: Llama, Mistral, Qwen2 (q/k/v biases), SmolLM, with GQA and tied embeddings.

Block structure (HF module names, relative to `model.layers.N`):
input_layernorm → self_attn.{q,k,v}_proj → self_attn.o_proj;
post_attention_layernorm → mlp.{gate,up}_proj → mlp.down_proj.
"""

from __future__ import annotations

from typing import Any

from qtool.models.base import Adapter, AttentionSpec, BlockPlan, ScaleGroup, register_adapter

Q, K, V, O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"


def _head_dim(cfg: Any) -> int:
    hd = getattr(cfg, "head_dim", None)
    return hd if hd else cfg.hidden_size // cfg.num_attention_heads


def _kv_heads(cfg: Any) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


@register_adapter
class LlamaAdapter(Adapter):
    name = "llama"
    architectures = (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
    )
    model_types = ("llama", "mistral", "qwen2")

    def check_config(self, cfg: Any) -> list[str]:
        problems = []
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"):
            if not getattr(cfg, key, None):
                problems.append(f"config has no {key}")
        if problems:
            return problems
        if cfg.num_attention_heads % _kv_heads(cfg):
            problems.append(
                f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {_kv_heads(cfg)}"
            )
        if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
            problems.append(f"hidden_act {cfg.hidden_act!r} is not SwiGLU's silu")
        return problems

    def num_blocks(self, cfg: Any) -> int:
        return cfg.num_hidden_layers

    def block_prefix(self, i: int) -> str:
        return f"model.layers.{i}"

    def blocks(self, model):
        return model.model.layers

    def attention(self, cfg: Any) -> AttentionSpec:
        # HF Llama/Mistral/Qwen2 apply RoPE with rotate_half: channel c pairs with c + d/2.
        return AttentionSpec(
            q=Q, k=K, v=V, o=O,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=_kv_heads(cfg),
            head_dim=_head_dim(cfg),
            rope="half",
        )

    def block_plan(self, cfg: Any) -> BlockPlan:
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        hd, nh, nkv = _head_dim(cfg), cfg.num_attention_heads, _kv_heads(cfg)
        linears = {
            Q: (nh * hd, hidden),
            K: (nkv * hd, hidden),
            V: (nkv * hd, hidden),
            O: (hidden, nh * hd),
            GATE: (inter, hidden),
            UP: (inter, hidden),
            DOWN: (hidden, inter),
        }
        groups = [ScaleGroup("qkv", "input_layernorm", "norm", (Q, K, V), inspect="self_attn")]
        skipped = []
        if linears[V][0] == linears[O][1]:
            groups.append(ScaleGroup("v-o", V, "linear", (O,)))
        else:
            skipped.append(
                f"v→o not applicable: v_proj.out ({linears[V][0]}) ≠ o_proj.in ({linears[O][1]}) (GQA)"
            )
        groups.append(ScaleGroup("gate-up", "post_attention_layernorm", "norm", (GATE, UP), inspect="mlp"))
        groups.append(ScaleGroup("up-down", UP, "linear", (DOWN,)))
        return BlockPlan(linears=linears, groups=groups, skipped=skipped)

    # Model-level modules (embeddings, final norm, head, rotary) used by the runner and rotation.
    def embed_tokens(self, model):
        return model.model.embed_tokens

    def final_norm(self, model):
        return model.model.norm

    def lm_head(self, model):
        return model.lm_head

    def rotary(self, model):
        return getattr(model.model, "rotary_emb", None)
