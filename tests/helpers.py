"""Shared builders for tests: tiny random-init HF causal LMs and a character-level tokenizer.

Everything is built in code (no downloads, no assets), and small enough for a 2-core CPU.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
# printable ASCII without the whitespace variants, plus the whitespace we want to round-trip
_CHARS = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\n", "\t"]


def tiny_vocab() -> dict[str, int]:
    """Token → id of the character-level tokenizer (specials first, then 97 characters)."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + _CHARS)}


def tiny_tokenizer(add_bos: bool = False):
    """A character-level fast tokenizer built in code (WordLevel over single characters).

    `len(tok)` is 100, so it fits models with `vocab >= 100`. With `add_bos`, a BOS `<s>` is
    prepended to every encoding (exercises tokenizers that add special tokens).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=tiny_vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
        model_max_length=1_000_000,
    )


def tiny_config(
    arch: str = "llama",
    vocab: int = 128,
    hidden: int = 64,
    inter: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tie: bool = True,
):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)  # Qwen2 linears carry q/k/v biases
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(f"unknown tiny architecture {arch!r}")


def tiny_llama(arch: str = "llama", seed: int = 0, **config):
    """A random-init HF causal LM (llama | qwen2 | mistral) in fp32, eval mode, no KV cache; `config`
    takes tiny_config's keywords (vocab, hidden, inter, layers, heads, kv_heads, tie)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if arch == "qwen2":  # biases are zero-initialised; make them non-trivial
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.copy_(torch.randn(proj.bias.shape, generator=g) * 0.1)
    model.eval()
    model.config.use_cache = False
    return model


def save_tiny(model, directory: Path | str, tokenizer=None) -> Path:
    """Write an HF directory: config.json + model.safetensors + the character-level tokenizer."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(d), safe_serialization=True)
    (tokenizer if tokenizer is not None else tiny_tokenizer()).save_pretrained(str(d))
    return d


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog.\n"
    "Pack my box with five dozen liquor jugs!\n\n"
    "How vexingly quick daft zebras jump; 1234567890.\n"
)


def _llama_cpp_permute(w, n_head: int):
    """The q/k row permutation llama.cpp's converter applies (HF rotate_half → interleaved RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, path: Path | str, name: str = "tiny", with_vocab_size: bool = True) -> Path:
    """Write a Llama HF model as an F32 GGUF file the way llama.cpp lays it out.

    Includes a small gpt2-style tokenizer (byte-level single characters plus two merges) so
    transformers can build a tokenizer from it. The vocabulary has `model.config.vocab_size`
    entries (at least 104 needed).
    """
    import gguf

    cfg = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    toks = ["<unk>", "<s>", "</s>", "\u0120", "\u010a"] + chars + ["th", "he"]
    if cfg.vocab_size < len(toks):
        raise ValueError(f"write_tiny_gguf needs vocab_size >= {len(toks)}")
    toks += [f"<extra_{i}>" for i in range(cfg.vocab_size - len(toks))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None) else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    if with_vocab_size:
        w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(toks)
    w.add_token_types([3, 3, 3] + [1] * (len(toks) - 3))
    w.add_token_merges(["t h", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], kv_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_mc_task(folder: Path, items: list[dict], metrics: tuple[str, ...] = ("acc",), name: str = "t_mc") -> None:
    """A local lm-eval multiple-choice task `name` in `folder` (`{name}.jsonl` + `{name}.yaml`, for `include_path`)
    over items {"q": prompt, "choices": [continuations], "label": index}, reporting `metrics` (mean, higher is
    better)."""
    import json

    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in items))
    metric_list = "".join(f"""  - metric: {m}
    aggregation: mean
    higher_is_better: true
""" for m in metrics)
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
{metric_list}""")


def block0_context(model, ids, batch: int = 2):
    """The calibration context of block 0 of a Llama-family model on the CPU (block-0 inputs of `ids` in
    micro-batches of `batch`), as the block runner hands it to a pass."""
    from qtool.calib.runner import BlockContext, capture_block0_inputs
    from qtool.models.llama import LlamaAdapter

    ad = LlamaAdapter()
    cpu = torch.device("cpu")
    hidden, kw, cb = capture_block0_inputs(model, ad, ids, cpu, batch, offload=True)
    return BlockContext(0, ad.block_prefix(0), model.model.layers[0], ad.block_plan(model.config),
                        ad.attention(model.config), hidden, kw, cb, cpu)
