"""transformers' `PhiForCausalLM` <-> our PhiModel, both ways, exactly.

The two are the same network (the released microsoft/phi-1 weights load into both): parallel block, partial rotary
("rotate half" on the first rotary_dim dims of each head), GELU with the tanh approximation (`gelu_new`), untied LM head
with a bias. Only the parameter layout differs:

    ours                               transformers
    wte.weight                         model.embed_tokens.weight
    blocks.{i}.ln.{weight,bias}        model.layers.{i}.input_layernorm.{weight,bias}
    blocks.{i}.attn.qkv.{weight,bias}  model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}   (rows [q; k; v])
    blocks.{i}.attn.proj.*             model.layers.{i}.self_attn.dense.*
    blocks.{i}.mlp.fc{1,2}.*           model.layers.{i}.mlp.fc{1,2}.*
    ln_f.*                             model.final_layernorm.*
    lm_head.*                          lm_head.*

Our fused QKV output is laid out (3, H, D) (model.py views it so), and each of transformers' projections (H, D), so the
split is three row blocks of d_model each.

A model with `fused_block=true` (model.py's FusedBlock, PaLM's fused GEMMs) stores per block
    blocks.{i}.in_proj.{weight,bias}   = rows [attn.qkv; mlp.fc1]                      (3C + M, C)
    blocks.{i}.out_proj.weight         = columns [attn.proj | mlp.fc2]                  (C, C + M)
    blocks.{i}.out_proj.bias           = attn.proj.bias + mlp.fc2.bias                  (C,)
`fuse_state_dict` / `unfuse_state_dict` convert (unfusing gives the summed bias to attn.proj and zero to mlp.fc2: the
same function, since only the sum ever reaches the residual). Exports always write transformers' unfused layout; the
config records `fused_block` so an import gives back the fused layout.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import torch

from phi_train.config import ModelConfig
from phi_train.errors import PhiTrainError
from phi_train.model import pad_vocab

EOS_PIECE = "<|endoftext|>"
_ACTS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation, what model.py's MLP computes


class InteropError(PhiTrainError):
    """A checkpoint or export that cannot be converted; one line naming the file or key and what is expected."""


_RENAME = [  # (ours, transformers) per-layer suffixes
    ("ln", "input_layernorm"),
    ("attn.proj", "self_attn.dense"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
]
_TOP = [("wte.weight", "model.embed_tokens.weight"), ("ln_f", "model.final_layernorm"), ("lm_head", "lm_head")]


def _block_indices(state: dict[str, torch.Tensor]) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})


def _take(state: dict[str, torch.Tensor], layout: str, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = state.get(key)
    if t is None:
        raise InteropError(f"{key} is missing from the model state (expected the {layout} layout)")
    if tuple(t.shape) != shape:
        raise InteropError(f"{key} has shape {tuple(t.shape)}, expected {shape} for the model config")
    return t.detach()


def fuse_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Unfused (Block) state -> FusedBlock state of the same function; non-block entries are kept as they are."""
    C, M = cfg.d_model, cfg.d_mlp
    out = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    g = functools.partial(_take, state, "unfused")
    for i in _block_indices(state):
        b = f"blocks.{i}."
        out[b + "ln.weight"], out[b + "ln.bias"] = g(b + "ln.weight", (C,)), g(b + "ln.bias", (C,))
        out[b + "in_proj.weight"] = torch.cat([g(b + "attn.qkv.weight", (3 * C, C)), g(b + "mlp.fc1.weight", (M, C))])
        out[b + "in_proj.bias"] = torch.cat([g(b + "attn.qkv.bias", (3 * C,)), g(b + "mlp.fc1.bias", (M,))])
        out[b + "out_proj.weight"] = torch.cat(
            [g(b + "attn.proj.weight", (C, C)), g(b + "mlp.fc2.weight", (C, M))], dim=1
        )
        out[b + "out_proj.bias"] = g(b + "attn.proj.bias", (C,)) + g(b + "mlp.fc2.bias", (C,))
    return out


def unfuse_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """FusedBlock state -> unfused (Block) state of the same function: the summed output bias goes to attn.proj,
    mlp.fc2's bias is zero. fuse_state_dict(unfuse_state_dict(s)) == s exactly."""
    C, M = cfg.d_model, cfg.d_mlp
    out = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    g = functools.partial(_take, state, "fused")
    for i in _block_indices(state):
        b = f"blocks.{i}."
        out[b + "ln.weight"], out[b + "ln.bias"] = g(b + "ln.weight", (C,)), g(b + "ln.bias", (C,))
        w_in, b_in = g(b + "in_proj.weight", (3 * C + M, C)), g(b + "in_proj.bias", (3 * C + M,))
        out[b + "attn.qkv.weight"], out[b + "mlp.fc1.weight"] = w_in[: 3 * C].clone(), w_in[3 * C :].clone()
        out[b + "attn.qkv.bias"], out[b + "mlp.fc1.bias"] = b_in[: 3 * C].clone(), b_in[3 * C :].clone()
        w_out, b_out = g(b + "out_proj.weight", (C, C + M)), g(b + "out_proj.bias", (C,))
        out[b + "attn.proj.weight"], out[b + "mlp.fc2.weight"] = w_out[:, :C].contiguous(), w_out[:, C:].contiguous()
        out[b + "attn.proj.bias"], out[b + "mlp.fc2.bias"] = b_out.clone(), torch.zeros_like(b_out)
    return out


def to_hf_state_dict(model_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers PhiForCausalLM's (new contiguous tensors; the input is not modified).
    A fused-block state (cfg.fused_block) is unfused first: transformers has separate projections."""
    if cfg.fused_block:
        model_state = unfuse_state_dict(model_state, cfg)
    out: dict[str, torch.Tensor] = {}
    C = cfg.d_model
    for key, t in model_state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            hf = next((h + key[len(o) :] for o, h in _TOP if key == o or key.startswith(o + ".")), None)
            if hf is None:
                raise InteropError(f"unexpected parameter {key!r} in the model state (not a PhiModel state dict?)")
            out[hf] = t.detach().clone().contiguous()
            continue
        i, mod, kind = m.groups()
        prefix = f"model.layers.{i}."
        if mod == "attn.qkv":
            if t.shape[0] != 3 * C:
                raise InteropError(f"{key} has {t.shape[0]} rows, expected 3 * d_model = {3 * C}")
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{prefix}self_attn.{name}.{kind}"] = t[j * C : (j + 1) * C].clone().contiguous()
            continue
        hf_mod = dict(_RENAME).get(mod)
        if hf_mod is None:
            raise InteropError(f"unexpected parameter {key!r} in the model state (not a PhiModel state dict?)")
        out[f"{prefix}{hf_mod}.{kind}"] = t.detach().clone().contiguous()
    return out


def hf_config(cfg: ModelConfig, vocab_rows: int, eos_id: int | None = None):
    """The transformers PhiConfig of our architecture. `vocab_rows`: embedding rows (our padded vocabulary)."""
    from transformers import PhiConfig

    return PhiConfig(
        vocab_size=vocab_rows,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        hidden_act="gelu_new",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.ln_eps,
        tie_word_embeddings=False,
        qk_layernorm=False,
        # transformers 5 keeps rope settings in rope_parameters (4.x took rope_theta / partial_rotary_factor directly)
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(cfg.rotary_base),
            "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim,
        },
        attention_dropout=cfg.attn_dropout,
        resid_pdrop=cfg.resid_dropout,
        embd_pdrop=0.0,  # phi-1 has no embedding dropout in our model
        bos_token_id=None,  # our tokenizer adds no BOS
        eos_token_id=eos_id,
        pad_token_id=None,
        architectures=["PhiForCausalLM"],
        dtype="float32",
        # what PhiConfig cannot say, so an import gives back the same ModelConfig
        phi_train={
            "name": cfg.name,
            "vocab_size": cfg.vocab_size,
            "fused_block": cfg.fused_block,
        },
    )


def _get(conf, key: str, default=None):
    return conf.get(key, default) if isinstance(conf, dict) else getattr(conf, key, default)


def config_from_hf(conf, where: str = "config") -> ModelConfig:
    """ModelConfig from a transformers PhiConfig (or its config.json as a dict); refuses what PhiModel cannot compute."""
    act = _get(conf, "hidden_act")
    if act not in _ACTS:
        raise InteropError(f"{where}: hidden_act={act!r} is not supported; PhiModel computes {' / '.join(_ACTS)}")
    if _get(conf, "qk_layernorm", False):
        raise InteropError(f"{where}: qk_layernorm=true is not supported by PhiModel (expected false)")
    heads = _get(conf, "num_attention_heads")
    kv = _get(conf, "num_key_value_heads") or heads
    if kv != heads:
        raise InteropError(f"{where}: num_key_value_heads={kv} != num_attention_heads={heads}; PhiModel has no GQA")
    rope = _get(conf, "rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise InteropError(f"{where}: rope_type={rope_type!r} is not supported (expected 'default')")
    theta = rope.get("rope_theta", _get(conf, "rope_theta", 10000.0))
    factor = rope.get("partial_rotary_factor", _get(conf, "partial_rotary_factor", 0.5))
    d_model = _get(conf, "hidden_size")
    head_dim = d_model // heads
    ours = _get(conf, "phi_train") or {}
    return ModelConfig(
        name=ours.get("name", "hf_import"),
        n_layer=_get(conf, "num_hidden_layers"),
        d_model=d_model,
        n_head=heads,
        d_mlp=_get(conf, "intermediate_size"),
        vocab_size=ours.get("vocab_size", _get(conf, "vocab_size")),
        max_seq_len=_get(conf, "max_position_embeddings"),
        rotary_dim=int(head_dim * factor),
        rotary_base=float(theta),
        ln_eps=float(_get(conf, "layer_norm_eps", 1e-5)),
        attn_dropout=float(_get(conf, "attention_dropout", 0.0) or 0.0),
        resid_dropout=float(_get(conf, "resid_pdrop", 0.0) or 0.0),
        init_std=float(_get(conf, "initializer_range", 0.02)),
        fused_block=bool(ours.get("fused_block", False)),  # older exports' "attention" is a kernel choice: ignored
    )


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], hf_conf) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """transformers PhiForCausalLM state (+ its PhiConfig or config dict) -> (ModelConfig, our state dict).

    A vocabulary that is not a multiple of 64 gets zero rows appended (PhiModel pads it); generation masks the logits
    of rows beyond the tokenizer's size, so they are never emitted.
    """
    cfg = config_from_hf(hf_conf)
    if _get(hf_conf, "tie_word_embeddings", False) and "lm_head.weight" not in hf_state:
        hf_state = {**hf_state, "lm_head.weight": hf_state["model.embed_tokens.weight"]}
    out: dict[str, torch.Tensor] = {}
    top = {h: o for o, h in _TOP}
    rename = {h: o for o, h in _RENAME}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in hf_state.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved; ours is recomputed
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            o = next((o + key[len(h) :] for h, o in top.items() if key == h or key.startswith(h + ".")), None)
            if o is None:
                raise InteropError(f"unexpected parameter {key!r} in the transformers state (not a PhiForCausalLM?)")
            out[o] = t.detach().float().clone().contiguous()
            continue
        i, mod, kind = m.groups()
        if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((i, kind), {})[mod.split(".")[1][0]] = t
            continue
        if mod not in rename:
            raise InteropError(f"unexpected parameter {key!r} in the transformers state (not a PhiForCausalLM?)")
        out[f"blocks.{i}.{rename[mod]}.{kind}"] = t.detach().float().clone().contiguous()
    for (i, kind), parts in qkv.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise InteropError(f"layer {i}: self_attn.{missing[0]}_proj.{kind} is missing from the transformers state")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]]).float().contiguous()
    if "lm_head.bias" not in out and "lm_head.weight" in out:  # a head without bias is the same head with bias 0
        out["lm_head.bias"] = torch.zeros(out["lm_head.weight"].shape[0])
    rows = out["wte.weight"].shape[0]
    if pad_vocab(rows) != rows:
        extra = pad_vocab(rows) - rows
        for key in ("wte.weight", "lm_head.weight", "lm_head.bias"):
            t = out[key]
            out[key] = torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])
    if cfg.fused_block:  # exported by a fused model: give it back its own layout
        out = fuse_state_dict(out, cfg)
    return cfg, out


def write_hf_tokenizer(tokenizer_path: str | Path, out_dir: str | Path) -> None:
    """Copy the SentencePiece model and add a `tokenizer_config.json` so `AutoTokenizer.from_pretrained(out_dir)`
    loads it (as LlamaTokenizer, converted from tokenizer.model): no BOS, no dummy prefix (legacy=False, matching how
    data_tools.tokenizer trains), EOS `<|endoftext|>`. Ids equal phi_train.tokenizer's except for a literal U+2581
    ("▁") in the text, which our Tokenizer spells as bytes and SentencePiece reads as a space."""
    out = Path(out_dir)
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    conf = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "bos_token": None,
        "eos_token": EOS_PIECE,
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")


def export_hf(
    model_state: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer_path: str | Path | None, out_dir: str | Path
) -> Path:
    """Write a directory `transformers.PhiForCausalLM.from_pretrained` (and `AutoTokenizer`) loads:
    model.safetensors (fp32), config.json, tokenizer.model + tokenizer_config.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos_id = None
    if tokenizer_path is not None:
        if not Path(tokenizer_path).is_file():
            raise InteropError(f"tokenizer model {str(tokenizer_path)!r} not found")
        from phi_train.tokenizer import Tokenizer

        eos_id = Tokenizer(tokenizer_path).eos_id
    hf_state = to_hf_state_dict(model_state, cfg)
    rows = hf_state["model.embed_tokens.weight"].shape[0]
    save_file({k: v.float() for k, v in hf_state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config(cfg, rows, eos_id).save_pretrained(str(out))
    if tokenizer_path is not None:
        write_hf_tokenizer(tokenizer_path, out)
    return out


def import_hf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, our fp32 state dict) from a transformers Phi directory (config.json + *.safetensors)."""
    from safetensors.torch import load_file

    p = Path(path)
    conf_path = p / "config.json"
    if not conf_path.is_file():
        raise InteropError(f"{p} is not a transformers model directory (no config.json)")
    conf = json.loads(conf_path.read_text())
    if conf.get("model_type") != "phi":
        raise InteropError(f"{conf_path}: model_type={conf.get('model_type')!r}, expected 'phi' (PhiForCausalLM)")
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise InteropError(f"{p} holds no *.safetensors weights (save with safe_serialization=True)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return from_hf_state_dict(state, conf)
